"""The encoder alone: exactness against the reference, batch invariance (CPU and device paths), input layouts,
device choice."""

import sys

import numpy as np
import pytest
import torch

from rqvae_ray.core.checkpoint import load_checkpoint_file
from rqvae_ray.core.encoder import (
    CHUNK_ROWS,
    FIRST_LAYER_ROWS,
    Encoder,
    SparseRows,
    TorchEncoder,
    choose_device,
    cuda_driver_loads,
    make_encoder,
)
from rqvae_ray.core.rows import rows_from_table, sparse_table
from tests.reference import reference_sids

MODELS = [("nyc", "rqvae-nyc-div0.25-commit0.5-lr5e-5"), ("tky", "rqvae-tky-div0.5-commit0.25-lr5e-5")]


def _load(hub, dataset, model):
    features = torch.load(hub / "datasets" / "comp5331poi" / dataset / "RQVAE Dataset" / "poi_features.pt").numpy()
    path = hub / "models" / "comp5331poi" / model / "rqvae_best.pt"
    return features, path


@pytest.mark.parametrize(("dataset", "model"), MODELS)
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


def test_rows_without_features(demo_hub):
    """A POI with no nonzero feature (alone or among others) still gets the reference SID."""
    features, path = _load(demo_hub, "nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5")
    mixed = features[:20].copy()
    mixed[[0, 7, 19]] = 0.0
    state = torch.load(path, weights_only=True)["model_state_dict"]
    ref_codes, ref_vectors = reference_sids(state, mixed)
    encoder = Encoder(load_checkpoint_file(path))
    for rows in (mixed, mixed[[7]], mixed[[0, 19]]):
        codes, vectors = encoder.encode(SparseRows.from_dense(rows))
        expected = reference_sids(state, rows)
        np.testing.assert_array_equal(codes, expected[0])
        np.testing.assert_array_equal(vectors, expected[1])
    codes, vectors = encoder.encode(SparseRows.from_dense(mixed))
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(vectors, ref_vectors)


def test_multi_hot_rows_get_the_bits_of_weights_of_one(demo_hub):
    """Multi-hot rows take scipy's CSR product on the CPU, weighted rows numpy's gathers: the same rows given with
    weights of 1.0 get the same latents (``assert_array_equal`` does not tell -0.0 from +0.0) and codes, and the CSR
    product's chunks of ``FIRST_LAYER_ROWS`` rows change nothing whatever the batch."""
    features, path = _load(demo_hub, "tky", "rqvae-tky-div0.5-commit0.25-lr5e-5")
    encoder = Encoder(load_checkpoint_file(path))
    multi_hot = SparseRows.from_dense(features)
    assert multi_hot.values is None and multi_hot.num_rows > 2 * FIRST_LAYER_ROWS
    ones = SparseRows(multi_hot.indptr, multi_hot.indices, np.ones(len(multi_hot.indices), dtype=np.float32))
    codes, latent = encoder.encode_latent(multi_hot)
    weighted_codes, weighted_latent = encoder.encode_latent(ones)
    np.testing.assert_array_equal(weighted_latent, latent)
    np.testing.assert_array_equal(weighted_codes, codes)
    for batch in (FIRST_LAYER_ROWS - 1, FIRST_LAYER_ROWS + 1, 3 * FIRST_LAYER_ROWS):
        got_codes, got_latent = _in_batches(encoder, features, batch)
        np.testing.assert_array_equal(got_latent, latent, err_msg=f"batch {batch}")
        np.testing.assert_array_equal(got_codes, codes, err_msg=f"batch {batch}")


def _in_batches(encoder: Encoder, features: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes and latents of ``features``, encoded ``batch`` rows at a time."""
    parts = [
        encoder.encode_latent(SparseRows.from_dense(features[start : start + batch]))
        for start in range(0, len(features), batch)
    ]
    return np.concatenate([codes for codes, _ in parts]), np.concatenate([latent for _, latent in parts])


def _assert_batch_invariant(encoder: TorchEncoder, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes and latents are the same bits in batches of 1 to 4,097 rows as in one batch of all; returns them.

    Batches under a chunk cover the last ``2 * batch + 1`` rows (each call costs a whole chunk), larger ones all."""
    codes, latent = encoder.encode_latent(SparseRows.from_dense(features))
    for batch in (1, 255, 256, 257, 4095, 4096, 4097):
        picked = slice(-(2 * batch + 1), None) if batch < CHUNK_ROWS else slice(None)
        got_codes, got_latent = _in_batches(encoder, features[picked], batch)
        np.testing.assert_array_equal(got_codes, codes[picked], err_msg=f"batch {batch}")
        np.testing.assert_array_equal(got_latent, latent[picked], err_msg=f"batch {batch}")
    return codes, latent


@pytest.mark.parametrize(("dataset", "model"), MODELS)
def test_torch_path_exact_and_batch_invariant(demo_hub, dataset, model):
    """The CUDA actor's code path, run on the CPU device: the reference's SIDs, the numpy encoder's codes and
    (to rounding) latents, bitwise the same whatever the batch; weighted inputs too."""
    features, path = _load(demo_hub, dataset, model)
    weights = load_checkpoint_file(path)
    numpy_encoder, torch_encoder = Encoder(weights), TorchEncoder(weights, "cpu")
    ref_codes, ref_vectors = reference_sids(torch.load(path, weights_only=True)["model_state_dict"], features)
    codes, latent = _assert_batch_invariant(torch_encoder, features)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(torch_encoder.vectors(codes), ref_vectors)
    np_codes, np_latent = numpy_encoder.encode_latent(SparseRows.from_dense(features))
    np.testing.assert_array_equal(codes, np_codes)
    np.testing.assert_allclose(latent, np_latent, rtol=0, atol=1e-12)
    weighted = SparseRows.from_dense(features[:300] * np.linspace(0.5, 2.0, features.shape[1], dtype=np.float32))
    np.testing.assert_array_equal(torch_encoder.encode(weighted)[0], numpy_encoder.encode(weighted)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("dataset", "model"), MODELS)
def test_cuda_codes_match_cpu(demo_hub, dataset, model):
    """On CUDA: the CPU encoder's codes and (to rounding) latents, bitwise the same whatever the batch."""
    features, path = _load(demo_hub, dataset, model)
    weights = load_checkpoint_file(path)
    numpy_encoder, cuda_encoder = Encoder(weights), TorchEncoder(weights, "cuda")
    codes, latent = _assert_batch_invariant(cuda_encoder, features)
    cpu_codes, cpu_latent = numpy_encoder.encode_latent(SparseRows.from_dense(features))
    np.testing.assert_array_equal(codes, cpu_codes)
    np.testing.assert_allclose(latent, cpu_latent, rtol=0, atol=1e-12)
    weighted = SparseRows.from_dense(features * np.linspace(0.5, 2.0, features.shape[1], dtype=np.float32))
    np.testing.assert_array_equal(cuda_encoder.encode(weighted)[0], numpy_encoder.encode(weighted)[0])


@pytest.mark.parametrize(
    ("gpu_ids", "cuda", "device"),
    [([], False, "cpu"), ([], True, "cpu"), ([0], False, "cpu"), ([0], True, "cuda"), (["1"], True, "cuda")],
)
def test_device_choice(gpu_ids, cuda, device):
    assert choose_device(gpu_ids, cuda) == device


def test_cuda_is_never_available_where_the_driver_does_not_load():
    assert cuda_driver_loads() or not torch.cuda.is_available()


@pytest.mark.skipif(cuda_driver_loads(), reason="the NVIDIA driver is here: a GPU actor imports torch")
def test_a_gpu_actor_without_the_driver_encodes_with_numpy_without_importing_torch(demo_hub, monkeypatch):
    """What a fake-GPU actor of a simulated cluster (or a GPU asked for on a CPU-only node) does."""
    _, path = _load(demo_hub, "nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5")
    weights = load_checkpoint_file(path)
    monkeypatch.setitem(sys.modules, "torch", None)  # an import of torch now fails
    encoder = make_encoder(weights, use_gpu=True)
    assert type(encoder) is Encoder


def test_column_outside_input_dimension(demo_hub):
    _, path = _load(demo_hub, "nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5")
    encoder = Encoder(load_checkpoint_file(path))
    rows = SparseRows(np.array([0, 1]), np.array([encoder.weights.input_dim]), None)
    with pytest.raises(ValueError, match="outside the model's input dimension"):
        encoder.encode(rows)


def test_ties_and_near_ties_go_to_the_exact_nearest_codeword():
    """Rows far out on (or just off) the bisector of two codewords, where the matrix-product distances cannot tell
    them apart, get the codeword with the smallest exact squared distance, the lower index on an exact tie,
    whatever the batch."""
    from rqvae_ray.core.checkpoint import Layer, ModelWeights

    rng = np.random.default_rng(3)
    dim = 4
    first = rng.standard_normal((6, dim)).astype(np.float32)
    second = rng.standard_normal((5, dim)).astype(np.float32)
    identity = Layer(np.eye(dim), np.zeros(dim), relu=False)
    weights = ModelWeights((identity,), (first, second), "published", "")
    a, b = first[0].astype(np.float64), first[3].astype(np.float64)
    normal = (b - a) / np.linalg.norm(b - a)
    along = rng.standard_normal((300, dim))
    along -= np.outer(along @ normal, normal)  # directions within the bisecting plane
    offsets = rng.choice([0.0, 1.0, -1.0], 300) * np.geomspace(1e-12, 1e-3, 300)
    latent = (a + b) / 2 + along * 1e5 + offsets[:, None] * normal
    latent[:2] = (a + b) / 2  # exactly on the bisector and close to both
    rows = SparseRows(
        np.arange(0, latent.size + 1, dim, dtype=np.int64), np.tile(np.arange(dim), len(latent)), latent.ravel()
    )

    def exact(points: np.ndarray) -> np.ndarray:
        codes = []
        for point in points:
            residual, row = point.copy(), []
            for book in (first, second):
                distances = [np.einsum("i,i->", residual - c, residual - c) for c in book.astype(np.float64)]
                row.append(int(np.argmin(distances)))
                residual -= book[row[-1]].astype(np.float64)
            codes.append(row)
        return np.array(codes)

    want = exact(latent)
    assert want[0, 0] == 0  # an exact tie: the lower index
    assert {0, 3} <= set(want[:, 0].tolist())
    codes, _ = Encoder(weights).encode(rows)
    np.testing.assert_array_equal(codes, want)
    for i in range(0, len(latent), 7):
        one = SparseRows(np.array([0, dim]), np.arange(dim), latent[i])
        np.testing.assert_array_equal(Encoder(weights).encode(one)[0][0], want[i])
