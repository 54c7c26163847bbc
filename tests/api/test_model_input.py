"""What the in-process encoder takes: feature columns are integer indices (3.9 is no column, not column 3), and
``load_model`` gives the loader's clean errors (and loads half-precision checkpoints)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import rqvae_ray
from rqvae_ray.api.model import Model
from rqvae_ray.errors import CheckpointError, DatasetError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS
from tests.core.test_checkpoint_safety import fitted
from tests.unit_models import DIM, weights


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(weights(7))


@pytest.mark.parametrize(
    ("rows", "shown"),
    [
        ([[3.9]], "3.9"),
        ([[1, 2], [3, 3.9]], "3.9"),
        ([np.array([3.0])], "3.0"),
        ([[True]], "True"),
        ([["3"]], "'3'"),
    ],
)
def test_column_indices_that_are_not_integers_are_refused(model, rows, shown):
    with pytest.raises(DatasetError) as caught:
        model.encode(rows)
    poi = len(rows) - 1
    assert str(caught.value) == (
        f"POI {poi} lists {shown} as a feature column; columns are integer indices (give dense features as a 2-D array)"
    )


def test_a_poi_that_is_not_a_flat_list_is_refused(model):
    with pytest.raises(DatasetError, match="POI 0 is not a flat list of feature column indices"):
        model.encode([[[1, 2]]])


def test_integer_indices_of_any_kind_give_the_same_codes(model):
    columns = [[0, 3, 7], [], [DIM - 1]]
    dense = np.zeros((3, DIM), dtype=np.float32)
    for row, cols in enumerate(columns):
        dense[row, cols] = 1.0
    want_codes, want_vectors = model.encode(dense)
    for rows in (columns, [np.array(c, dtype=np.uint8) for c in columns], [tuple(map(np.int32, c)) for c in columns]):
        codes, vectors = model.encode(rows)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(vectors, want_vectors)


def _bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_load_model_gives_the_loaders_clean_errors(tmp_path):
    published = fitted(DEFAULT_MODELS[0])
    state = published["model_state_dict"]
    half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
    (tmp_path / "half.pt").write_bytes(_bytes({**published, "model_state_dict": half}))
    assert rqvae_ray.load_model(tmp_path / "half.pt").codebook_sizes == (32, 32, 32)
    huge = {**state, "encoder.proj.weight": torch.zeros(128).expand(2**31, 128)}
    data = _bytes({**published, "model_state_dict": huge})
    (tmp_path / "huge.pt").write_bytes(data)
    for source, name in ((tmp_path / "huge.pt", str(tmp_path / "huge.pt")), (data, "checkpoint bytes")):
        with pytest.raises(CheckpointError) as caught:
            rqvae_ray.load_model(source)
        assert str(caught.value).startswith(
            f"{name}: tensor 'model_state_dict.encoder.proj.weight' of shape [2147483648, 128] (torch.float32) "
            f"claims {2**31 * 128 * 4} bytes, more than the whole file's {len(data)}"
        )
