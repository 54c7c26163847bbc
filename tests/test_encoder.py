"""The encoder alone: exactness against the reference, batch invariance, input layouts, device choice."""

import numpy as np
import pytest
import torch

from rqvae_ray.checkpoint import load_checkpoint_file
from rqvae_ray.encoder import Encoder, SparseRows, TorchEncoder, choose_device
from rqvae_ray.features import rows_from_table, sparse_table
from tests.reference import reference_sids


def _load(hub, dataset, model):
    features = torch.load(hub / "datasets" / "comp5331poi" / dataset / "RQVAE Dataset" / "poi_features.pt").numpy()
    path = hub / "models" / "comp5331poi" / model / "rqvae_best.pt"
    return features, path


@pytest.mark.parametrize(
    ("dataset", "model"),
    [("nyc", "rqvae-nyc-div0.25-commit0.5-lr5e-5"), ("tky", "rqvae-tky-div0.5-commit0.25-lr5e-5")],
)
def test_exact_against_reference_and_batch_invariant(demo_hub, dataset, model):
    features, path = _load(demo_hub, dataset, model)
    state = torch.load(path, weights_only=True)["model_state_dict"]
    before = {k: v.clone() for k, v in state.items()}
    ref_codes, ref_vectors = reference_sids(state, features)
    encoder = Encoder(load_checkpoint_file(path))
    codes, vectors = encoder.encode(SparseRows.from_dense(features))
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_allclose(vectors, ref_vectors, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(vectors, ref_vectors)  # same codewords summed in the same float32 order
    for batch in (1, 7, 300):
        for start in range(0, 600, batch):
            part, _ = encoder.encode(SparseRows.from_dense(features[start : start + batch]))
            np.testing.assert_array_equal(part, codes[start : start + batch])
    assert all(torch.equal(before[k], v) for k, v in state.items())


def test_dense_values_and_table_round_trip(demo_hub):
    features, path = _load(demo_hub, "nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5")
    rng = np.random.default_rng(0)
    weighted = features[:500] * rng.uniform(0.5, 2.0, size=features[:500].shape).astype(np.float32)
    encoder = Encoder(load_checkpoint_file(path))
    state = torch.load(path, weights_only=True)["model_state_dict"]
    rows = SparseRows.from_dense(weighted)
    assert rows.values is not None
    codes, _ = encoder.encode(rows_from_table(sparse_table(rows)))
    np.testing.assert_array_equal(codes, reference_sids(state, weighted)[0])
    multi_hot = SparseRows.from_dense(features[:50])
    assert multi_hot.values is None
    back = rows_from_table(sparse_table(multi_hot))
    np.testing.assert_array_equal(back.indptr, multi_hot.indptr)
    np.testing.assert_array_equal(back.indices, multi_hot.indices)


def test_torch_path_matches_numpy_path(demo_hub):
    """The CUDA actor's code path, run on the CPU device, gives the same SIDs."""
    features, path = _load(demo_hub, "tky", "rqvae-tky-div0.0-commit0.25-lr5e-5")
    weights = load_checkpoint_file(path)
    rows = SparseRows.from_dense(features[:1500])
    np_codes, np_vectors = Encoder(weights).encode(rows)
    t_codes, t_vectors = TorchEncoder(weights, "cpu").encode(rows)
    np.testing.assert_array_equal(np_codes, t_codes)
    np.testing.assert_array_equal(np_vectors, t_vectors)


@pytest.mark.parametrize(
    ("gpu_ids", "cuda", "device"),
    [([], False, "cpu"), ([], True, "cpu"), ([0], False, "cpu"), ([0], True, "cuda"), (["1"], True, "cuda")],
)
def test_device_choice(gpu_ids, cuda, device):
    assert choose_device(gpu_ids, cuda) == device


def test_column_outside_input_dimension(demo_hub):
    _, path = _load(demo_hub, "nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5")
    encoder = Encoder(load_checkpoint_file(path))
    rows = SparseRows(np.array([0, 1]), np.array([encoder.weights.input_dim]), None)
    with pytest.raises(ValueError, match="outside the model's input dimension"):
        encoder.encode(rows)
