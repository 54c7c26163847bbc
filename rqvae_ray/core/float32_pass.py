"""A float32 pass over the encoder that keeps a row's codes only where it can prove them equal to the float64 path's.

The float64 path (:class:`rqvae_ray.core.encoder.Encoder`) decides the published codes. This pass computes the same
network in float32, at about half the cost, and alongside each row a bound ``E`` on the distance between its float32
latent and the float64 path's latent, from the standard forward-error bounds (Higham, *Accuracy and Stability of
Numerical Algorithms*, 3.1 and 3.5), which hold for any order of summation, any blocking and fused multiply-adds:

* a dot product of ``n`` terms plus a bias, computed in precision ``u`` from weights rounded to it, is off by at most
  ``gamma(n + 2) * (|W| |x| + |b|)`` element-wise, ``gamma(k) = k u / (1 - k u)``; in 2-norms at most ``gamma(n + 2)``
  times ``norm(|W| |x|) + norm(b)``, and ``norm(|W| |x|)`` is at most ``norm(|W|) norm(x)`` and, for inputs after a
  ReLU, at most ``sum_j x_j norm(W[:, j])``, whichever is smaller on the row;
* this pass sums each product in parts of ``PART_TERMS`` terms, added part after part: a term then meets at most
  ``PART_TERMS - 1 + parts - 1`` additions, so ``n + 2`` becomes ``PART_TERMS + parts + 1`` (the float64 path sums
  all the inputs in one product);
* the first layer adds each row's ``m`` columns: ``gamma(m + 3) * (sum_j |x_j| norm(W[:, j]) + norm(b))``;
* an error ``e`` in a layer's input grows to at most ``norm(W) * e`` (ReLU does not grow it);
* both the float32 latent and the float64 path's latent are within their own bound of the exact one, so they are within
  the sum of the two bounds of each other. Underflow adds at most a few ``2**-126`` per element: an absolute slack of
  ``TINY`` per layer covers it, flushed subnormals included.

Per level, the quantizer's float32 residual ``r`` is then within ``delta`` (``E``, plus each level's rounding of the
residual's subtraction in both precisions) of the float64 path's. For codewords ``a`` (this pass's choice) and ``b``,
``|r - b|**2 - |r - a|**2`` is linear in ``r`` and moves by at most ``2 delta |b - a|`` between the two residuals, so if
every computed gap exceeds its ``2 delta |b - a|`` plus a multiple of the float64 path's own shortlist margin and the
float32 distances' rounding, the float64 path chooses ``a`` as well. A row is certain when every level passes; the
encoder sends the rest through the float64 path. Every bound is a norm per row, so the checks cost a small part of the
pass; they are loose (about a thousand times the actual error on the NYC models), and about one row in eleven is left
to the float64 path.

The bounds assume IEEE arithmetic with a BLAS that computes ordinary dot products in the arrays' precision (no
Strassen-like schemes, no reduced-precision accumulation), as OpenBLAS does. Rows whose float32 values overflow get
infinite bounds or NaN gaps and are never certain.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights

U32 = 2.0**-24
U64 = 2.0**-53
# Per-layer absolute slack for underflow (a few 2**-126 per element, times the weights' norm).
TINY = 1e-30
# Relative slack on every computed norm, covering the float32/float64 rounding of the norms themselves.
NORM_SLACK = 1e-3
# The float64 path's shortlist margin (SHORTLIST_MARGIN) and rounding, with room to spare.
DECISION_MARGIN = 4e-10
# The pass keeps a [K, K] table of codeword distances per level: models with larger codebooks encode in float64 only.
MAX_CODEWORDS = 4096


def _gamma(terms: int, u: float) -> float:
    """``k u / (1 - k u)``; infinite (nothing proven) where ``k u`` is not small."""
    return terms * u / (1.0 - terms * u) if terms * u < 0.5 else np.inf


@dataclass(frozen=True)
class _Dense:
    """One later layer: float32 weights and the norms its error bound needs."""

    weight_t: np.ndarray  # float32 [in, out]
    bias: np.ndarray  # float32 [out]
    relu: bool
    norm: float  # spectral norm of W (how much an input error grows)
    abs_norm: float  # spectral norm of |W| (how large the rounding can be)
    column_norms: np.ndarray | None  # float32 [in] norms of W's columns, where the inputs are >= 0 (after a ReLU)
    bias_norm: float
    gamma32: float  # this pass's rounding (see _terms)
    gamma64: float  # the float64 path's: one product of all inputs, then the bias


# Each dense product is summed in parts of at most this many terms, added part after part: a dot product's worst-case
# rounding then grows with PART_TERMS + parts, not with all its terms.
PART_TERMS = 128


def _terms(inputs: int) -> int:
    """The ``k`` of ``gamma(k)`` for one dense layer: a part's terms, the parts' additions, the bias, the weights."""
    return min(inputs, PART_TERMS) + -(-inputs // PART_TERMS) + 1


def _product(block: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """``block @ weight_t`` summed in parts of ``PART_TERMS`` inputs, added part after part (see ``_terms``)."""
    out = block[:, :PART_TERMS] @ weight_t[:PART_TERMS]
    for start in range(PART_TERMS, len(weight_t), PART_TERMS):
        out += block[:, start : start + PART_TERMS] @ weight_t[start : start + PART_TERMS]
    return out


def _spectral_norm(matrix: np.ndarray) -> float:
    """An upper bound of ``matrix``'s 2-norm: the root of its Gram matrix's largest eigenvalue (the smaller side; a
    few times faster than an SVD), with NORM_SLACK for the rounding of both."""
    if not matrix.size:
        return 0.0
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return float(np.sqrt(max(float(np.linalg.eigvalsh(gram)[-1]), 0.0))) * (1 + NORM_SLACK)


def _column_norms(weight: np.ndarray) -> np.ndarray:
    """float32 norms of each column of ``weight``, rounded up, with room for a float32 sum of nonnegative terms
    (short of the exact sum by at most ``gamma(inputs)``) to stay above the exact sum of ``x_j norm(W[:, j])``."""
    norms = np.linalg.norm(weight, axis=0) * (1 + NORM_SLACK) * (1 + 2 * _gamma(weight.shape[1], U32))
    return np.nextafter(norms.astype(np.float32), np.float32(np.inf))


def _row_norms(block: np.ndarray) -> np.ndarray:
    """Upper bounds of each row's 2-norm of a float32 block, as float64 (inf where a square overflows: such rows are
    never certain).

    The sum of squares is taken in float32, so it may be ``gamma(width)`` short: the slack adds that.
    """
    slack = 1 + NORM_SLACK + _gamma(block.shape[1] + 1, U32)
    return np.sqrt(np.einsum("ij,ij->i", block, block).astype(np.float64)) * slack


def _pair_distances(book: np.ndarray, squared_lengths: np.ndarray) -> np.ndarray:
    """float32 [K, K] upper bounds of ``|b - a|`` for every pair of codewords (symmetric); ``squared_lengths``: each
    codeword's ``|a|**2`` summed in float64.

    From ``|a|**2 + |b|**2 - 2 a.b`` in float64 ([K, K] memory, not [K, K, latent]), plus that sum's worst rounding,
    ``gamma(latent + 2) (|a| + |b|)**2``.
    """
    wide = book.astype(np.float64)
    lengths = np.sqrt(squared_lengths)
    squares = squared_lengths[:, None] + squared_lengths[None, :] - 2.0 * (wide @ wide.T)
    squares += _gamma(book.shape[1] + 2, U64) * (lengths[:, None] + lengths[None, :]) ** 2
    distances = np.sqrt(np.maximum(squares, 0.0)) * (1 + NORM_SLACK)
    return np.nextafter(distances.astype(np.float32), np.float32(np.inf))


class Float32Pass:
    """The float32 pass of one model; :meth:`codes` returns each row's codes and whether they are proven.

    It only reads its arrays, so the threads of one process share one pass per model (:meth:`of`): building one
    costs ~5 ms (mostly the spectral norms), as much as the pass saves on a few thousand rows.
    """

    _shared: dict[int, Float32Pass] = {}
    _lock = threading.Lock()

    @staticmethod
    def fits(weights: ModelWeights) -> bool:
        """Whether every codebook is small enough for the pass's per-level table of distances."""
        return max(weights.codebook_sizes) <= MAX_CODEWORDS

    @classmethod
    def of(cls, weights: ModelWeights) -> Float32Pass:
        """The pass of ``weights``, built once per process while ``weights`` lives."""
        with cls._lock:
            built = cls._shared.get(id(weights))
            if built is None:
                built = cls._shared[id(weights)] = cls(weights)
                weakref.finalize(weights, cls._shared.pop, id(weights), None)
            return built

    def __init__(self, weights: ModelWeights) -> None:
        first, *later = weights.layers
        self._first_weight_t = np.ascontiguousarray(first.weight.T, dtype=np.float32)
        self._first_bias = first.bias.astype(np.float32)
        self._first_relu = first.relu
        self._column_norms = np.linalg.norm(first.weight, axis=0) * (1 + NORM_SLACK)
        self._first_bias_norm = float(np.linalg.norm(first.bias)) * (1 + NORM_SLACK)
        relus = [layer.relu for layer in weights.layers[:-1]]
        self._layers = [
            _Dense(
                weight_t=np.ascontiguousarray(layer.weight.T, dtype=np.float32),
                bias=layer.bias.astype(np.float32),
                relu=layer.relu,
                norm=_spectral_norm(layer.weight),
                abs_norm=_spectral_norm(np.abs(layer.weight)),
                column_norms=_column_norms(layer.weight) if relu else None,
                bias_norm=float(np.linalg.norm(layer.bias)) * (1 + NORM_SLACK),
                gamma32=_gamma(_terms(layer.weight.shape[1]), U32),
                gamma64=_gamma(layer.weight.shape[1] + 1, U64),
            )
            for layer, relu in zip(later, relus, strict=True)
        ]
        self._books = [np.ascontiguousarray(book, dtype=np.float32) for book in weights.codebooks]
        norms = [np.einsum("ij,ij->i", book, book, dtype=np.float64) for book in self._books]
        self._book_norms = [n.astype(np.float32) for n in norms]
        self._radius = [float(np.sqrt(n.max())) * (1 + NORM_SLACK) for n in norms]
        # |b - a| for every pair of codewords (rounded up): how far a residual's error can move a's gap to b.
        self._distances = [_pair_distances(book, n) for book, n in zip(self._books, norms, strict=True)]
        self._spread = [float(d.max()) for d in self._distances]
        self._indices = [np.arange(len(book), dtype=np.int32)[:, None] for book in self._books]
        # What the float32 distances and their differences may round, in units of the terms' magnitudes.
        self._rounding = 3 * _gamma(weights.latent_dim + 2, U32)

    def codes(
        self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``codes`` int32 [n, levels] of CSR rows and ``certain`` bool [n]: where they equal the float64 path's."""
        # float32 overflows to infinities (and NaNs where they meet) on inputs the float64 path has the range for:
        # their bounds and gaps are not finite, so those rows are never certain.
        with np.errstate(over="ignore", invalid="ignore"):
            latent, bound = self._latent(indptr, indices, values)
            return self._quantize(latent, bound)

    def _latent(
        self, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float32 latent and a bound (float64) on its distance to the float64 path's latent, per row."""
        from scipy.sparse import csr_array  # ~0.2 s to import: only the processes that encode pay it

        n = len(indptr) - 1
        shape = (n, len(self._first_weight_t))
        weights = np.ones(len(indices), dtype=np.float32) if values is None else values.astype(np.float32)
        hidden = csr_array((weights, indices, indptr), shape=shape) @ self._first_weight_t
        hidden += self._first_bias
        magnitudes = np.ones(len(indices)) if values is None else np.abs(values.astype(np.float64))
        size = csr_array((magnitudes, indices, indptr), shape=shape) @ self._column_norms + self._first_bias_norm
        terms = int(np.diff(indptr).max(initial=0)) + 3  # most columns of a row, the bias, rounding values and weights
        error32 = _gamma(terms, U32) * size + TINY
        error64 = _gamma(terms, U64) * size + TINY
        if self._first_relu:
            np.maximum(hidden, 0.0, out=hidden)
        for layer in self._layers:
            norms = _row_norms(hidden)
            # A bound of norm(|W| |x|): norm(|W|) norm(x), or for inputs >= 0 the sum of x_j norm(W[:, j]) (about
            # two thirds of the first on the NYC models).
            size = layer.abs_norm * norms
            if layer.column_norms is not None:
                size = np.minimum(size, (hidden @ layer.column_norms).astype(np.float64))
            grows = layer.abs_norm + 1.0
            error64 = (
                layer.norm * error64
                + layer.gamma64 * (size + layer.abs_norm * (error32 + error64) + layer.bias_norm)
                + TINY * grows
            )
            error32 = layer.norm * error32 + layer.gamma32 * (size + layer.bias_norm) + TINY * grows
            hidden = _product(hidden, layer.weight_t)
            hidden += layer.bias
            if layer.relu:
                np.maximum(hidden, 0.0, out=hidden)
        return hidden, error32 + error64

    def _quantize(self, latent: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes from the float32 latent, and where the float64 path provably chooses the same (module docstring).

        The residual and the distances are float32 too: their own rounding is a few ``U32`` of the magnitudes
        involved, a small addition to ``delta`` per level and to the margin each gap must clear.
        """
        n = len(latent)
        rows = np.arange(n)
        delta = bound + TINY
        certain = np.isfinite(delta) & np.isfinite(latent).all(axis=1)
        residual = latent
        codes = np.empty((n, len(self._books)), dtype=np.int32)
        # Distances are [codewords, rows]: numpy reduces over the first axis of a C array with vector instructions,
        # over the last one row by row (several times slower for 32 codewords).
        for level, (book, norms) in enumerate(zip(self._books, self._book_norms, strict=True)):
            radius = self._radius[level]
            approx = book @ residual.T
            approx *= -2.0
            approx += norms[:, None]
            lowest = approx.min(axis=0)
            # The first nearest (a NaN row has none: it takes the last index, and is not certain anyway).
            chosen = np.where(approx == lowest, self._indices[level], len(book) - 1).min(axis=0)
            # Each other codeword b, less what the residual's error can take off its gap: 2 delta |b - a|.
            others = np.take(self._distances[level], chosen, axis=1)
            others *= np.nextafter((2.0 * delta).astype(np.float32), np.float32(np.inf))
            np.subtract(approx, others, out=others)
            others[chosen, rows] = np.inf
            size = _row_norms(residual)
            reach = size + delta
            need = DECISION_MARGIN * (reach**2 + radius**2) + self._rounding * (
                radius**2 + 2.0 * reach * radius + 2.0 * delta * self._spread[level]
            )
            certain &= (others.min(axis=0).astype(np.float64) - lowest) > need + TINY
            # Both paths round each residual's subtraction: U32 and U64 of |r - c| <= size + delta + radius.
            delta = delta + 2.0 * U32 * (reach + radius)
            codes[:, level] = chosen
            residual -= np.take(book, chosen, axis=0)
        return codes, certain
