"""The demo hub's fitting: faster paths that must give the checkpoints the same bits."""

import numpy as np
import pytest
import torch

from rqvae_ray.inputs.demo import _nearest, fit_checkpoint, nyc_features
from rqvae_ray.inputs.model_ids import parse_model_id


@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_nearest_codeword_in_chunks_is_the_one_array_argmin(rows):
    rng = np.random.default_rng(7)
    points = rng.standard_normal((300, 16))
    book = rng.standard_normal((12, 16))
    book[5] = book[2]  # a tie: the first index wins, as in one array
    points[:20] = book[2] + 1e-3 * rng.standard_normal((20, 16))
    expected = np.square(points[:, None, :] - book[None]).sum(2).argmin(1)
    assert np.array_equal(_nearest(points, book, rows=rows), expected)


def test_a_checkpoint_is_the_same_from_float32_or_float64_features():
    features = nyc_features()[0][:400]
    spec = parse_model_id("comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5")
    narrow = fit_checkpoint(spec, features)["model_state_dict"]
    wide = fit_checkpoint(spec, features.astype(np.float64))["model_state_dict"]
    assert narrow.keys() == wide.keys()
    assert all(torch.equal(narrow[key], wide[key]) for key in narrow)
