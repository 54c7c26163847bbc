"""The float32 pass: its error bound holds, it never keeps a code the float64 path would not choose, and the encoder
gives the float64 path's codes with it (real models and data, near-ties, overflow)."""

import gc

import numpy as np
import pytest
import torch

from rqvae_ray.core.checkpoint import Layer, ModelWeights, load_checkpoint_file
from rqvae_ray.core.encoder import FLOAT32_PASS_ROWS, Encoder, SparseRows
from rqvae_ray.core.float32_pass import MAX_CODEWORDS, Float32Pass

MODELS = [("nyc", "rqvae-nyc-div0.0-commit0.5-lr5e-5"), ("tky", "rqvae-tky-div0.5-commit0.25-lr5e-5")]


def _exact(weights: ModelWeights) -> Encoder:
    return Encoder(weights, float32_pass=False)


def _pass(weights: ModelWeights, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
    return Float32Pass(weights).codes(rows.indptr, rows.indices, rows.values)


def _mlp(seed: int, books: tuple[np.ndarray, ...], dim: int = 30, hidden: int = 48) -> ModelWeights:
    """Three layers with ReLU and float64 weights that are not float32 numbers (as after folding BatchNorm)."""
    rng = np.random.default_rng(seed)
    latent = books[0].shape[1]
    shapes = [(hidden, dim), (hidden, hidden), (latent, hidden)]
    layers = tuple(
        Layer(rng.standard_normal(shape) / np.sqrt(shape[1]), rng.standard_normal(shape[0]) * 0.1, relu=i < 2)
        for i, shape in enumerate(shapes)
    )
    return ModelWeights(layers, books, "published", "")


def _weighted_rows(count: int, dim: int, seed: int) -> SparseRows:
    rng = np.random.default_rng(seed)
    return SparseRows.from_dense((rng.random((count, dim)) < 0.3) * rng.uniform(0.1, 3.0, (count, dim)))


def test_the_bound_holds_on_every_row():
    """The float32 latent is within the bound of the float64 path's latent, row by row (multi-hot and weighted)."""
    rng = np.random.default_rng(1)
    weights = _mlp(1, tuple(rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)))
    weighted = _weighted_rows(3000, 30, seed=2)
    multi_hot = SparseRows(weighted.indptr, weighted.indices, None)
    for rows in (weighted, multi_hot):
        latent32, bound = Float32Pass(weights)._latent(rows.indptr, rows.indices, rows.values)
        _, latent64 = _exact(weights).encode_latent(rows)
        distance = np.linalg.norm(latent32 - latent64, axis=1)
        assert (distance <= bound).all()
        assert (distance > 0).any()  # float32 does round: the comparison has something to bound
        assert np.median(bound) < 1e-3 * np.median(np.linalg.norm(latent64, axis=1))


def test_near_ties_are_left_to_the_float64_path():
    """Latents just off the bisector of two codewords, behind an ill-conditioned dense layer (its inputs are hundreds
    of times the latents, so float32 cancels several digits away): float32 alone picks the other codeword on some
    rows; the pass never keeps those, and the encoder gives the float64 path's codes for every row, in any batch."""
    rng = np.random.default_rng(3)
    dim = 8
    books = (rng.standard_normal((6, dim)).astype(np.float32), rng.standard_normal((5, dim)).astype(np.float32))
    left, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    right, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    mixing = left @ np.diag(np.geomspace(1.0, 1e-3, dim)) @ right.T
    bias = rng.standard_normal(dim)
    layers = (Layer(np.eye(dim), np.zeros(dim), relu=False), Layer(mixing, bias, relu=False))
    weights = ModelWeights(layers, books, "published", "")
    a, b = books[0][0].astype(np.float64), books[0][3].astype(np.float64)
    normal = (b - a) / np.linalg.norm(b - a)
    along = rng.standard_normal((3000, dim))
    along -= np.outer(along @ normal, normal)
    offsets = rng.choice([1.0, -1.0], 3000) * np.geomspace(1e-12, 1e-1, 3000)
    latent = (a + b) / 2 + along * 3 + offsets[:, None] * normal
    inputs = np.linalg.solve(mixing, (latent - bias).T).T
    rows = SparseRows(
        np.arange(0, inputs.size + 1, dim, dtype=np.int64), np.tile(np.arange(dim), len(inputs)), inputs.ravel()
    )
    want = _exact(weights).codes(rows)
    assert {0, 3} <= set(want[:, 0].tolist())
    codes, certain = _pass(weights, rows)
    wrong = (codes != want).any(axis=1)
    assert wrong.any()  # float32 alone gets some rows wrong: the test has teeth
    assert not (wrong & certain).any()
    assert certain.mean() > 0.5
    encoder = Encoder(weights)
    np.testing.assert_array_equal(encoder.codes(rows), want)
    for batch in (1, 97, FLOAT32_PASS_ROWS + 3):
        for start in range(0, 600, batch):
            part = rows.subset((np.arange(rows.num_rows) >= start) & (np.arange(rows.num_rows) < start + batch))
            np.testing.assert_array_equal(encoder.codes(part), want[start : start + batch])


def test_values_that_overflow_float32_go_to_the_float64_path():
    """Values whose float32 products overflow (to infinities, and to NaNs where infinities meet) leave their rows
    to the float64 path, which has the range for them."""
    rng = np.random.default_rng(11)
    weights = _mlp(3, tuple(rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)))
    rows = _weighted_rows(60, 30, seed=12)
    big = np.arange(len(rows.values)) % 7 == 0
    signs = np.where(np.arange(len(rows.values)) % 2 == 0, 1.0, -1.0)
    for scale in (1e36 * big + ~big, 3e38 * big * signs + ~big):
        huge = SparseRows(rows.indptr, rows.indices, rows.values * scale)
        codes, certain = _pass(weights, huge)
        assert not certain[np.repeat(np.arange(huge.num_rows), np.diff(huge.indptr))[big]].any()
        assert certain.any()
        np.testing.assert_array_equal(Encoder(weights).codes(huge), _exact(weights).codes(huge))


@pytest.mark.parametrize(("dataset", "model"), MODELS)
def test_real_models_and_data(demo_hub, dataset, model):
    """On the bundled POIs the pass proves most rows, and the encoder's codes are the float64 path's."""
    features = torch.load(demo_hub / "datasets/comp5331poi" / dataset / "RQVAE Dataset/poi_features.pt").numpy()
    weights = load_checkpoint_file(demo_hub / "models/comp5331poi" / model / "rqvae_best.pt")
    rows = SparseRows.from_dense(features)
    want = _exact(weights).codes(rows)
    codes, certain = _pass(weights, rows)
    assert certain.mean() > 0.5
    np.testing.assert_array_equal(codes[certain], want[certain])
    np.testing.assert_array_equal(Encoder(weights).codes(rows), want)


def test_subset():
    rows = SparseRows(np.array([0, 2, 2, 5]), np.array([1, 3, 0, 2, 4]), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    picked = rows.subset(np.array([True, False, True]))
    np.testing.assert_array_equal(picked.indptr, [0, 2, 5])
    np.testing.assert_array_equal(picked.indices, [1, 3, 0, 2, 4])
    np.testing.assert_array_equal(picked.values, [1.0, 2.0, 3.0, 4.0, 5.0])
    last = SparseRows(rows.indptr, rows.indices, None).subset(np.array([False, True, True]))
    np.testing.assert_array_equal(last.indptr, [0, 0, 3])
    np.testing.assert_array_equal(last.indices, [0, 2, 4])
    assert last.values is None


def test_one_pass_per_model_while_it_lives():
    """The threads of a process share each model's pass; it goes with its weights."""
    rng = np.random.default_rng(13)
    weights = _mlp(4, tuple(rng.standard_normal((16, 8)).astype(np.float32) for _ in range(3)))
    other = _mlp(5, weights.codebooks)
    assert Float32Pass.of(weights) is Float32Pass.of(weights) is Encoder(weights)._float32
    assert Float32Pass.of(other) is not Float32Pass.of(weights)
    key = id(weights)
    del weights
    gc.collect()
    assert key not in Float32Pass._shared


def test_codebooks_too_large_for_the_distance_table_encode_in_float64():
    rng = np.random.default_rng(17)
    small = rng.standard_normal((4, 8)).astype(np.float32)
    large = rng.standard_normal((MAX_CODEWORDS + 1, 8)).astype(np.float32)
    assert Encoder(_mlp(6, (small, small)))._float32 is not None
    weights = _mlp(6, (small, large))
    assert Encoder(weights)._float32 is None
    rows = _weighted_rows(40, 30, seed=18)
    np.testing.assert_array_equal(Encoder(weights).codes(rows), _exact(weights).codes(rows))
