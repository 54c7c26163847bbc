"""The frozen encoder + residual quantizer, computed so that every row's SID is independent of its batch.

Batch invariance is by construction, not by luck:

* everything before the argmin runs in float64;
* the first layer is a gather-sum over each row's nonzero inputs, added in ascending column order, one row at a
  time in effect (dense inputs are turned into that sparse form first, so both input layouts give the same bits);
* every later layer runs as matrix products over blocks of exactly ``BLOCK_ROWS`` rows (the last block is padded),
  so the BLAS kernel, and therefore its rounding, is the same whatever the batch size;
* the nearest codeword is the argmin of ``sum((r - c)**2)`` per row (one row's sum never depends on other rows),
  ties to the lowest index. On the CPU a matrix product (``|c|**2 - 2 r.c``, whose rounding may depend on the batch)
  only shortlists: every codeword within a margin far above its rounding error of the best is a candidate, and a
  row with more than one candidate is decided by the exact sums. The true nearest codeword is always on the
  shortlist, so the answer is the exact one whatever the batch.

The Vector is the sum of the chosen float32 codewords, accumulated in float32 level by level, as the original
system's quantizer does: it depends on the codes alone.

CPU work uses numpy only (no torch import in CPU actors); :class:`TorchEncoder` runs the same steps on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.errors import InputDimensionError

BLOCK_ROWS = 256
# The shortlist margin, relative to |r|**2 + max |c|**2: about 1e6 times the rounding error of a 64-term float64
# dot product, and still far below any distance gap that matters.
SHORTLIST_MARGIN = 1e-10


@dataclass(frozen=True)
class SparseRows:
    """Rows in CSR form: row ``i`` has columns ``indices[indptr[i]:indptr[i+1]]`` (ascending) with ``values``."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [nnz]
    values: np.ndarray | None  # float32/64 [nnz]; None means all ones (multi-hot)

    @property
    def num_rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_dense(cls, dense: np.ndarray, chunk_elements: int = 1 << 24) -> SparseRows:
        """CSR form of a dense 2-D array (explicit zeros dropped), values in its dtype.

        Built ``chunk_elements`` entries of rows at a time, in two passes (count, then fill arrays of the final size):
        the temporary memory does not grow with the number of rows, and a memory-mapped ``dense`` is only read.
        """
        n = dense.shape[0]
        step = max(1, chunk_elements // max(1, dense.shape[1]))
        indptr = np.zeros(n + 1, dtype=np.int64)
        for start in range(0, n, step):
            indptr[start + 1 : start + step + 1] = np.count_nonzero(dense[start : start + step], axis=1)
        np.cumsum(indptr, out=indptr)
        indices = np.empty(int(indptr[-1]), dtype=np.int64)
        values = np.empty(int(indptr[-1]), dtype=dense.dtype)
        all_ones = True
        for start in range(0, n, step):
            chunk = dense[start : start + step]
            rows, cols = np.nonzero(chunk)  # row-major order: the CSR order
            first, last = indptr[start], indptr[min(start + step, n)]
            indices[first:last] = cols
            values[first:last] = chunk[rows, cols]
            all_ones = all_ones and bool((values[first:last] == 1).all())
        return cls(indptr, indices, None if all_ones else values)

    def padded(self) -> tuple[np.ndarray, np.ndarray | None]:
        """``[n, width]`` column indices (padding points at column -1) and values (padding 0); ``width >= 1``."""
        counts = np.diff(self.indptr)
        # At least one slot, so that rows without features still read one (zero) column.
        width = max(1, int(counts.max()) if len(counts) else 0)
        slots = np.arange(width)
        mask = slots[None, :] < counts[:, None]
        cols = np.full((self.num_rows, width), -1, dtype=np.int64)
        cols[mask] = self.indices
        if self.values is None:
            return cols, None
        vals = np.zeros((self.num_rows, width), dtype=np.float64)
        vals[mask] = self.values
        return cols, vals


def codeword_sums(codebooks: tuple[np.ndarray, ...], codes: np.ndarray) -> np.ndarray:
    """The Vector of each row: its codewords (float32) summed in float32 from level 0 up; a function of the codes."""
    vectors = np.zeros((len(codes), codebooks[0].shape[1]), dtype=np.float32)
    for level, book in enumerate(codebooks):
        vectors += book[codes[:, level]]
    return vectors


class Encoder:
    """Encodes feature rows to (codes, vectors) with a frozen :class:`ModelWeights` on the CPU."""

    def __init__(self, weights: ModelWeights) -> None:
        self.weights = weights
        first = weights.layers[0]
        # Column -1 (the padding of SparseRows.padded) reads this appended zero column.
        # C order: gathering rows of a column-major array is two orders of magnitude slower.
        self._first_columns = np.ascontiguousarray(np.vstack([first.weight.T, np.zeros((1, first.weight.shape[0]))]))
        self._first_bias = first.bias
        # One gathered term per row of a block, reused: small enough to stay in cache (np.take would copy into a
        # strided `out`, so it is a contiguous buffer of its own).
        self._term = np.empty((BLOCK_ROWS, first.weight.shape[0]), dtype=np.float64)
        self._codebooks64 = [book.astype(np.float64) for book in weights.codebooks]
        self._codeword_norms = [np.einsum("ij,ij->i", book, book) for book in self._codebooks64]

    def encode(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and ``vectors`` float32 [n, latent]."""
        codes, _latent = self.encode_latent(rows)
        return codes, self.vectors(codes)

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and the encoder's output ``z`` float64 [n, latent]."""
        self._check_columns(rows)
        cols, vals = rows.padded()
        latent = np.empty((rows.num_rows, self.weights.latent_dim), dtype=np.float64)
        for start in range(0, rows.num_rows, BLOCK_ROWS):
            block = slice(start, start + BLOCK_ROWS)
            hidden = self._first_layer(cols[block], None if vals is None else vals[block])
            latent[block] = self._dense_layers(hidden)
        # The quantizer decides each row on its own (see the module docstring), so it takes the whole batch at once.
        return self._quantize(latent), latent

    def _check_columns(self, rows: SparseRows) -> None:
        if len(rows.indices) and (rows.indices.min() < 0 or rows.indices.max() >= self.weights.input_dim):
            bad = rows.indices.min() if rows.indices.min() < 0 else rows.indices.max()
            raise InputDimensionError(int(bad), self.weights.input_dim)

    def vectors(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen float32 codewords, accumulated in float32 from level 0 up."""
        return codeword_sums(self.weights.codebooks, codes)

    def _first_layer(self, cols: np.ndarray, vals: np.ndarray | None) -> np.ndarray:
        slot_cols = np.ascontiguousarray(cols.T)  # [slots, rows]: each gather reads contiguous indices
        # mode="wrap" reads padding (column -1) from the appended zero row, and unlike mode="raise" writes `out`
        # directly rather than through a temporary.
        hidden = np.take(self._first_columns, slot_cols[0], axis=0, mode="wrap")
        if vals is not None:
            hidden *= vals[:, 0, None]
        # Slot after slot, so that each row's terms are added in ascending column order.
        term = self._term[: len(cols)]
        for slot in range(1, len(slot_cols)):
            np.take(self._first_columns, slot_cols[slot], axis=0, out=term, mode="wrap")
            if vals is not None:
                term *= vals[:, slot, None]
            hidden += term
        hidden += self._first_bias
        return hidden

    def _dense_layers(self, block: np.ndarray) -> np.ndarray:
        rows = len(block)
        if rows < BLOCK_ROWS:
            block = np.vstack([block, np.zeros((BLOCK_ROWS - rows, block.shape[1]))])
        layers = self.weights.layers
        if layers[0].relu:
            block = np.maximum(block, 0.0)
        for layer in layers[1:]:
            block = block @ layer.weight.T
            block += layer.bias
            if layer.relu:
                np.maximum(block, 0.0, out=block)
        return block[:rows]

    def _quantize(self, latent: np.ndarray) -> np.ndarray:
        residual = latent.copy()
        codes = np.empty((len(latent), len(self._codebooks64)), dtype=np.int32)
        for level, (book, norms) in enumerate(zip(self._codebooks64, self._codeword_norms, strict=True)):
            approx = norms[None, :] - 2.0 * (residual @ book.T)
            chosen = approx.argmin(axis=1)
            margin = SHORTLIST_MARGIN * (np.einsum("ij,ij->i", residual, residual) + norms.max())
            shortlist = approx <= (approx.min(axis=1) + margin)[:, None]
            undecided = np.count_nonzero(shortlist, axis=1) > 1
            if undecided.any():
                difference = residual[undecided][:, None, :] - book[None, :, :]
                chosen[undecided] = np.einsum("ijk,ijk->ij", difference, difference).argmin(axis=1)
            codes[:, level] = chosen
            residual -= book[chosen]
        return codes


class TorchEncoder(Encoder):
    """The same computation as :class:`Encoder` with torch on a given device (used for CUDA actors)."""

    def __init__(self, weights: ModelWeights, device: str) -> None:
        super().__init__(weights)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        self._t_first_columns = as_tensor(self._first_columns)
        self._t_first_bias = as_tensor(self._first_bias)
        self._t_layers = [(as_tensor(layer.weight.T), as_tensor(layer.bias), layer.relu) for layer in weights.layers]
        self._t_codebooks = [as_tensor(book) for book in self._codebooks64]

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and the encoder's output ``z`` float64 [n, latent]."""
        self._check_columns(rows)
        n = rows.num_rows
        codes = np.empty((n, len(self.weights.codebooks)), dtype=np.int32)
        latent = np.empty((n, self.weights.latent_dim), dtype=np.float64)
        if n:
            hidden = self._device_first_layer(rows)
            for start in range(0, n, BLOCK_ROWS):
                block = slice(start, start + BLOCK_ROWS)
                dense = self._dense_layers(hidden[block])
                codes[block] = self._quantize(dense)
                latent[block] = dense.cpu().numpy()
        return codes, latent

    def _device_first_layer(self, rows: SparseRows):
        torch = self._torch
        cols, vals = rows.padded()
        t_cols = torch.from_numpy(cols).to(self.device)
        t_vals = None if vals is None else torch.from_numpy(vals).to(self.device)
        hidden = torch.zeros((rows.num_rows, self._t_first_columns.shape[1]), dtype=torch.float64, device=self.device)
        for slot in range(cols.shape[1]):
            term = self._t_first_columns[t_cols[:, slot]]
            if t_vals is not None:
                term = term * t_vals[:, slot, None]
            hidden += term
        hidden += self._t_first_bias
        return hidden

    def _dense_layers(self, block):  # type: ignore[override]
        torch = self._torch
        rows = block.shape[0]
        if rows < BLOCK_ROWS:
            pad = torch.zeros((BLOCK_ROWS - rows, block.shape[1]), dtype=block.dtype, device=self.device)
            block = torch.cat([block, pad])
        if self._t_layers[0][2]:
            block = torch.clamp_min(block, 0.0)
        for weight_t, bias, relu in self._t_layers[1:]:
            block = block @ weight_t + bias
            if relu:
                block = torch.clamp_min(block, 0.0)
        return block[:rows]

    def _quantize(self, latent) -> np.ndarray:  # type: ignore[override]
        torch = self._torch
        residual = latent.clone()
        codes = torch.empty((latent.shape[0], len(self._t_codebooks)), dtype=torch.int64, device=self.device)
        for level, book in enumerate(self._t_codebooks):
            distances = torch.square(residual[:, None, :] - book[None, :, :]).sum(dim=2)
            chosen = torch.argmin(distances, dim=1)
            codes[:, level] = chosen
            residual -= book[chosen]
        return codes.cpu().numpy().astype(np.int32)


def choose_device(use_gpu: bool, cuda_available: bool) -> str:
    """``cuda`` iff a GPU was given to this process and CUDA is available, else ``cpu``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so ``cuda`` is the device Ray chose.
    """
    return "cuda" if use_gpu and cuda_available else "cpu"


def make_encoder(weights: ModelWeights, use_gpu: bool = False) -> Encoder:
    """A CUDA encoder when a GPU was given (and CUDA works), the numpy CPU encoder otherwise."""
    if not use_gpu:
        return Encoder(weights)
    import torch

    device = choose_device(use_gpu, torch.cuda.is_available())
    return TorchEncoder(weights, device) if device == "cuda" else Encoder(weights)


# What builds each model's encoder in an encode stage: ``make_encoder``, or a benchmark's stand-in. Ray pickles it into
# the encoder actors, so it is a module-level function or a picklable object.
EncoderFactory = Callable[[ModelWeights, bool], Encoder]
