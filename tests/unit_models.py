"""Small synthetic models and sparse POI rows for in-process tests (no Ray, no torch)."""

from __future__ import annotations

import numpy as np

from rqvae_ray.core.checkpoint import Layer, ModelWeights
from rqvae_ray.core.encoder import SparseRows

DIM, HIDDEN, LATENT = 40, 16, 8


def weights(seed: int, sizes: tuple[int, ...] = (4, 4, 3)) -> ModelWeights:
    """A random frozen two-layer encoder and residual codebooks of ``sizes`` (few codewords: many shared SIDs)."""
    rng = np.random.default_rng(seed)
    layers = (
        Layer(rng.standard_normal((HIDDEN, DIM)), rng.standard_normal(HIDDEN) * 0.1, relu=True),
        Layer(rng.standard_normal((LATENT, HIDDEN)) * 0.3, rng.standard_normal(LATENT) * 0.1, relu=False),
    )
    books = tuple(
        rng.standard_normal((size, LATENT)).astype(np.float32) * (1.5**-level) for level, size in enumerate(sizes)
    )
    return ModelWeights(layers, books, "published", f"sha-{seed}")


def rows(count: int, seed: int = 0) -> SparseRows:
    """``count`` multi-hot rows with 1-5 ascending nonzero columns each."""
    rng = np.random.default_rng(seed)
    cols = [np.sort(rng.choice(DIM, size=rng.integers(1, 6), replace=False)) for _ in range(count)]
    indptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum([len(c) for c in cols], out=indptr[1:])
    return SparseRows(indptr, np.concatenate(cols).astype(np.int64), None)
