"""The frozen encoder + residual quantizer, computed so that every row's SID is independent of its batch.

Batch invariance is by construction, not by luck:

* everything before the argmin runs in float64;
* the first layer is a gather-sum over each row's nonzero inputs, added in ascending column order, one row at a
  time in effect (dense inputs are turned into that sparse form first, so both input layouts give the same bits).
  Multi-hot rows (every value 1) take scipy's CSR product, which adds ``1.0 * column`` to a zero row for each of a
  row's columns in turn: the same sums (a product by 1.0 is exact, so a fused multiply-add rounds alike), at half the
  cost of numpy's gathers; they start from +0.0, which can change only the sign of a zero sum, and no distance, code
  or Vector sees that sign;
* every later layer runs as matrix products over blocks of exactly ``BLOCK_ROWS`` rows (the last block is padded),
  so the BLAS kernel, and therefore its rounding, is the same whatever the batch size;
* the nearest codeword is the argmin of ``sum((r - c)**2)`` per row (one row's sum never depends on other rows),
  ties to the lowest index. On the CPU a matrix product (``|c|**2 - 2 r.c``, whose rounding may depend on the batch)
  only shortlists: every codeword within a margin far above its rounding error of the best is a candidate, and a
  row with more than one candidate is decided by the exact sums. The true nearest codeword is always on the
  shortlist, so the answer is the exact one whatever the batch.

The Vector is the sum of the chosen float32 codewords, accumulated in float32 level by level, as the original
system's quantizer does: it depends on the codes alone.

CPU work uses numpy and scipy only (no torch import in CPU actors). :class:`TorchEncoder` (CUDA actors) runs the same
steps with torch, batch-invariant in the same way:

* the batch is cut into chunks of exactly ``CHUNK_ROWS`` rows (``TILES_PER_CHUNK`` blocks, the last chunk padded with
  rows that read only zeros), and every kernel runs on a chunk or a fixed share of one: the same shapes, so the same
  kernels and launch configurations, whatever the batch;
* the first layer is the same gather-sum, as element-wise adds (exact in any launch);
* each later layer is one ``torch.bmm`` over the chunk's ``[tiles, 256, width]`` view: ``TILES_PER_CHUNK`` problems of
  the CPU path's block shape, decomposed alike, so a row's rounding can depend at most on its place in its block, as
  on the CPU (one product over the chunk's 4,096 rows would leave it to how cuBLAS splits 16 times as many output
  tiles: split-K and stream-K schedules may sum some tiles' K ranges differently);
* the quantizer takes the exact ``sum((r - c)**2)`` of every codeword (no shortlist) in steps of a fixed shape, with
  the latent zero-padded to a multiple of 4 so that every row's sum starts equally aligned; ``torch.argmin`` returns
  the first of equal minima;
* inputs go up from pinned memory on a side stream, the next chunk's copy overlapping this chunk's compute; codes and
  latents come back once per chunk. cuBLAS only ever runs on the compute stream.

The two paths round the later layers differently, so they agree on every code except where a row's two nearest
codewords are closer than float64 rounding; each is batch-invariant on its own.

On the CPU, :meth:`Encoder.codes` (the codes without the latents) first runs the float32 pass of
:mod:`rqvae_ray.core.float32_pass`, which keeps a row's codes only where a forward-error bound proves them equal to
this float64 path's, and sends the other rows (about one in eleven on the NYC models) through the float64 path: the
same codes whatever the batch, at about 0.7 times the cost.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.core.float32_pass import Float32Pass
from rqvae_ray.errors import InputDimensionError

if TYPE_CHECKING:
    import torch

    _Inputs = tuple[torch.Tensor, torch.Tensor | None]  # one chunk's column indices and values on the device

BLOCK_ROWS = 256
# The device encoder's fixed chunk of whole blocks, padded like the last block (see TorchEncoder).
TILES_PER_CHUNK = 16
CHUNK_ROWS = TILES_PER_CHUNK * BLOCK_ROWS
# Multi-hot rows whose first layer one CSR product computes on the CPU: 2 MiB of activations, not the whole batch's.
FIRST_LAYER_ROWS = 1024
# At most this many float64 differences [rows, codewords, latent] in one step of the device quantizer (128 MiB).
QUANTIZE_ELEMENTS = 1 << 24
# Rows per step of the float32 pass (its activations stay a few MiB whatever the batch).
FLOAT32_PASS_ROWS = 4096
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

    @property
    def nbytes(self) -> int:
        return self.indptr.nbytes + self.indices.nbytes + (0 if self.values is None else self.values.nbytes)

    @classmethod
    def from_dense(cls, dense: np.ndarray, chunk_elements: int = 1 << 24) -> SparseRows:
        """CSR form of a dense 2-D array (explicit zeros dropped), values in its dtype.

        Built ``chunk_elements`` entries of rows at a time, in two passes (count, then fill arrays of the final size):
        the temporary memory does not grow with the number of rows, and a memory-mapped ``dense`` is only read.
        """
        n, width = dense.shape
        step = max(1, chunk_elements // max(1, width))
        indptr = np.zeros(n + 1, dtype=np.int64)
        for start in range(0, n, step):
            indptr[start + 1 : start + step + 1] = np.count_nonzero(dense[start : start + step] != 0, axis=1)
        np.cumsum(indptr, out=indptr)
        indices = np.empty(int(indptr[-1]), dtype=np.int64)
        values = np.empty(int(indptr[-1]), dtype=dense.dtype)
        all_ones = True
        for start in range(0, n, step):
            chunk = dense[start : start + step].reshape(-1)
            # Flat positions of a boolean mask, in row-major (CSR) order: ~7x faster than np.nonzero on the floats.
            flat = np.flatnonzero(chunk != 0)
            first, last = indptr[start], indptr[min(start + step, n)]
            indices[first:last] = flat % width
            values[first:last] = chunk[flat]
            all_ones = all_ones and bool((values[first:last] == 1).all())
        return cls(indptr, indices, None if all_ones else values)

    def slice(self, start: int, stop: int) -> SparseRows:
        """Rows ``start``..``stop - 1``."""
        lo, hi = self.indptr[start], self.indptr[stop]
        values = None if self.values is None else self.values[lo:hi]
        return SparseRows(self.indptr[start : stop + 1] - lo, self.indices[lo:hi], values)

    def subset(self, keep: np.ndarray) -> SparseRows:
        """The rows where ``keep`` (bool [n]) is true, in order."""
        counts = np.diff(self.indptr)
        entries = np.repeat(keep, counts)
        indptr = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(counts[keep])])
        return SparseRows(indptr, self.indices[entries], None if self.values is None else self.values[entries])

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
    """Encodes feature rows to (codes, vectors) with a frozen :class:`ModelWeights` on the CPU.

    :meth:`codes` takes a float32 pass first and the float64 path only for the rows whose codes it cannot prove
    (:mod:`rqvae_ray.core.float32_pass`): the same codes, in about 0.7 times the time. A subclass that computes codes
    another way (another device, a benchmark's stand-in) overrides :meth:`encode_latent` and passes
    ``float32_pass=False``.
    """

    def __init__(self, weights: ModelWeights, float32_pass: bool = True) -> None:
        self.weights = weights
        self._float32 = Float32Pass.of(weights) if float32_pass and Float32Pass.fits(weights) else None
        first = weights.layers[0]
        # Column -1 (the padding of SparseRows.padded) reads this appended zero column.
        # C order: gathering rows of a column-major array is two orders of magnitude slower.
        self._first_columns = np.ascontiguousarray(np.vstack([first.weight.T, np.zeros((1, first.weight.shape[0]))]))
        self._first_weight_t = self._first_columns[:-1]
        self._first_bias = first.bias
        # One gathered term per row of a block, reused: small enough to stay in cache (np.take would copy into a
        # strided `out`, so it is a contiguous buffer of its own).
        self._term = np.empty((BLOCK_ROWS, first.weight.shape[0]), dtype=np.float64)
        self._codebooks64 = [book.astype(np.float64) for book in weights.codebooks]
        self._codeword_norms = [np.einsum("ij,ij->i", book, book) for book in self._codebooks64]

    def encode(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and ``vectors`` float32 [n, latent]."""
        codes = self.codes(rows)
        return codes, self.vectors(codes)

    def codes(self, rows: SparseRows) -> np.ndarray:
        """``codes`` int32 [n, levels]: those of :meth:`encode_latent`, from the float32 pass where it proves them."""
        if self._float32 is None:
            return self.encode_latent(rows)[0]
        self._check_columns(rows)
        codes = np.empty((rows.num_rows, len(self.weights.codebooks)), dtype=np.int32)
        certain = np.empty(rows.num_rows, dtype=bool)
        for start in range(0, rows.num_rows, FLOAT32_PASS_ROWS):
            stop = min(start + FLOAT32_PASS_ROWS, rows.num_rows)
            part = rows.slice(start, stop)
            codes[start:stop], certain[start:stop] = self._float32.codes(part.indptr, part.indices, part.values)
        if not certain.all():
            codes[~certain] = Encoder.encode_latent(self, rows.subset(~certain))[0]
        return codes

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and the encoder's output ``z`` float64 [n, latent]."""
        self._check_columns(rows)
        latent = np.empty((rows.num_rows, self.weights.latent_dim), dtype=np.float64)
        if rows.values is None:
            for start in range(0, rows.num_rows, FIRST_LAYER_ROWS):
                hidden = self._multi_hot_first_layer(rows, start, min(start + FIRST_LAYER_ROWS, rows.num_rows))
                for block in range(0, len(hidden), BLOCK_ROWS):
                    latent[start + block : start + block + BLOCK_ROWS] = self._dense_layers(
                        hidden[block : block + BLOCK_ROWS]
                    )
        else:
            cols, vals = rows.padded()
            for start in range(0, rows.num_rows, BLOCK_ROWS):
                block = slice(start, start + BLOCK_ROWS)
                latent[block] = self._dense_layers(self._first_layer(cols[block], vals[block]))
        # The quantizer decides each row on its own (see the module docstring), so it takes the whole batch at once.
        return self._quantize(latent), latent

    def _check_columns(self, rows: SparseRows) -> None:
        if len(rows.indices) and (rows.indices.min() < 0 or rows.indices.max() >= self.weights.input_dim):
            bad = rows.indices.min() if rows.indices.min() < 0 else rows.indices.max()
            raise InputDimensionError(int(bad), self.weights.input_dim)

    def vectors(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen float32 codewords, accumulated in float32 from level 0 up."""
        return codeword_sums(self.weights.codebooks, codes)

    def _multi_hot_first_layer(self, rows: SparseRows, start: int, stop: int) -> np.ndarray:
        """The first layer of rows ``start:stop`` when every value is 1 (see the module docstring)."""
        from scipy.sparse import csr_array  # ~0.2 s to import: only the processes that encode pay it

        first, last = rows.indptr[start], rows.indptr[stop]
        ones = csr_array(
            (np.ones(last - first), rows.indices[first:last], rows.indptr[start : stop + 1] - first),
            shape=(stop - start, len(self._first_weight_t)),
        )
        hidden = ones @ self._first_weight_t
        hidden += self._first_bias
        return hidden

    def _first_layer(self, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """The first layer of one block of weighted rows (``SparseRows.padded``): term by term, in column order."""
        slot_cols = np.ascontiguousarray(cols.T)  # [slots, rows]: each gather reads contiguous indices
        # mode="wrap" reads padding (column -1) from the appended zero row, and unlike mode="raise" writes `out`
        # directly rather than through a temporary.
        hidden = np.take(self._first_columns, slot_cols[0], axis=0, mode="wrap")
        hidden *= vals[:, 0, None]
        # Slot after slot, so that each row's terms are added in ascending column order.
        term = self._term[: len(cols)]
        for slot in range(1, len(slot_cols)):
            np.take(self._first_columns, slot_cols[slot], axis=0, out=term, mode="wrap")
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
    """The same computation as :class:`Encoder` with torch on a given device (used for CUDA actors), in chunks of
    ``CHUNK_ROWS`` rows so that every kernel sees the same shapes whatever the batch (see the module docstring)."""

    def __init__(self, weights: ModelWeights, device: str) -> None:
        super().__init__(weights, float32_pass=False)
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self._cuda = self.device.type == "cuda"
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
        self._t_first_columns = as_tensor(self._first_columns)
        self._t_first_bias = as_tensor(self._first_bias)
        self._first_relu = weights.layers[0].relu
        # Each weight once on the device, seen as [tiles, in, out] (batch stride 0) by torch.bmm.
        self._t_layers = [
            (as_tensor(layer.weight.T).expand(TILES_PER_CHUNK, -1, -1), as_tensor(layer.bias), layer.relu)
            for layer in weights.layers[1:]
        ]
        # Zero columns up to a multiple of 4 (they add +0.0 to each distance) keep every row's run of differences
        # 32-byte aligned, so that the reduction never starts it differently by its position in the chunk.
        self._latent_width = -(-weights.latent_dim // 4) * 4
        pad = ((0, 0), (0, self._latent_width - weights.latent_dim))
        self._t_codebooks = [as_tensor(np.pad(book, pad)) for book in self._codebooks64]
        # Rows per quantizer step: a power of two, so that the steps tile the chunk with one shape.
        self._quantize_rows = [
            1 << (max(1, min(CHUNK_ROWS, QUANTIZE_ELEMENTS // book.numel())).bit_length() - 1)
            for book in self._t_codebooks
        ]
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """Return ``codes`` int32 [n, levels] and the encoder's output ``z`` float64 [n, latent]."""
        self._check_columns(rows)
        torch = self._torch
        n = rows.num_rows
        chunks = -(-n // CHUNK_ROWS)
        cols, vals = rows.padded()
        # Padding rows read only the zero column; their results are dropped.
        host_cols = self._host(cols, -1, torch.int64)
        host_vals = None if vals is None else self._host(vals, 0.0, torch.float64)
        codes = self._pinned((chunks * CHUNK_ROWS, len(self._t_codebooks)), torch.int32)
        latent = self._pinned((chunks * CHUNK_ROWS, self._latent_width), torch.float64)
        for chunk, (chunk_cols, chunk_vals) in enumerate(self._device_chunks(host_cols, host_vals)):
            part = slice(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)
            chunk_latent = self._dense_layers(self._device_first_layer(chunk_cols, chunk_vals))
            codes[part].copy_(self._quantize(chunk_latent), non_blocking=True)
            latent[part].copy_(chunk_latent, non_blocking=True)
        if self._cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return codes.numpy()[:n].copy(), latent.numpy()[:n, : self.weights.latent_dim].copy()

    def _pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised host tensor, page-locked on CUDA (so that copies to and from it are asynchronous)."""
        return self._torch.empty(shape, dtype=dtype, pin_memory=self._cuda)

    def _host(self, padded: np.ndarray, fill: float, dtype: torch.dtype) -> torch.Tensor:
        """``padded`` in a host tensor of whole chunks, the rows past its end set to ``fill``."""
        n = len(padded)
        host = self._pinned((-(-n // CHUNK_ROWS) * CHUNK_ROWS, padded.shape[1]), dtype)
        host.numpy()[:n] = padded
        host.numpy()[n:] = fill
        return host

    def _device_chunks(self, host_cols: torch.Tensor, host_vals: torch.Tensor | None) -> Iterator[_Inputs]:
        """Each chunk's inputs on the device, the next chunk's copy started before this one is handed out."""
        chunks = len(host_cols) // CHUNK_ROWS
        upload = self._upload(host_cols, host_vals, 0)
        for chunk in range(chunks):
            if self._cuda:
                compute = self._torch.cuda.current_stream(self.device)
                compute.wait_stream(self._copy_stream)
                for tensor in upload:
                    if tensor is not None:
                        tensor.record_stream(compute)  # its memory is not reused until the compute stream is past
            ready = upload
            if chunk + 1 < chunks:
                upload = self._upload(host_cols, host_vals, chunk + 1)
            yield ready

    def _upload(self, host_cols: torch.Tensor, host_vals: torch.Tensor | None, chunk: int) -> _Inputs:
        """Start copying one chunk's inputs to the device (on the copy stream on CUDA)."""
        part = slice(chunk * CHUNK_ROWS, (chunk + 1) * CHUNK_ROWS)
        with self._torch.cuda.stream(self._copy_stream) if self._cuda else nullcontext():
            cols = host_cols[part].to(self.device, non_blocking=True)
            vals = None if host_vals is None else host_vals[part].to(self.device, non_blocking=True)
        return cols, vals

    def _device_first_layer(self, cols: torch.Tensor, vals: torch.Tensor | None) -> torch.Tensor:
        """The gather-sum of :meth:`Encoder._first_layer`: element-wise adds, slot after slot."""
        columns = self._t_first_columns
        hidden = columns[cols[:, 0]]  # index -1 (padding) reads the appended zero row
        if vals is not None:
            hidden *= vals[:, 0, None]
        for slot in range(1, cols.shape[1]):
            term = columns[cols[:, slot]]
            if vals is not None:
                term *= vals[:, slot, None]
            hidden += term
        hidden += self._t_first_bias
        return hidden

    def _dense_layers(self, block: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """The later layers on one chunk, as batched products over its ``TILES_PER_CHUNK`` tiles."""
        torch = self._torch
        tiles = block.view(TILES_PER_CHUNK, BLOCK_ROWS, -1)
        if self._first_relu:
            tiles.clamp_min_(0.0)
        for weight_t, bias, relu in self._t_layers:
            tiles = torch.bmm(tiles, weight_t)
            tiles += bias
            if relu:
                tiles.clamp_min_(0.0)
        latent = tiles.reshape(CHUNK_ROWS, -1)
        return torch.nn.functional.pad(latent, (0, self._latent_width - latent.shape[1]))

    def _quantize(self, latent: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Codes int32 [CHUNK_ROWS, levels] on the device: per level the exact argmin, in steps of a fixed shape."""
        torch = self._torch
        residual = latent.clone()
        levels = []
        for book, step in zip(self._t_codebooks, self._quantize_rows, strict=True):
            chosen = torch.cat(
                [
                    # argmin returns the first of equal minima: ties go to the lowest index.
                    torch.argmin((residual[start : start + step, None, :] - book).square_().sum(dim=2), dim=1)
                    for start in range(0, CHUNK_ROWS, step)
                ]
            )
            residual -= book[chosen]
            levels.append(chosen)
        return torch.stack(levels, dim=1).to(torch.int32)


def choose_device(use_gpu: bool, cuda_available: bool) -> str:
    """``cuda`` iff a GPU was given to this process and CUDA is available, else ``cpu``.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the GPU it assigned, so ``cuda`` is the device Ray chose.
    """
    return "cuda" if use_gpu and cuda_available else "cpu"


def cuda_driver_loads() -> bool:
    """Whether the NVIDIA driver's library (``libcuda``), without which CUDA is never available, loads here: a node
    without it is not worth importing torch for (1.6 CPU-seconds) only to learn that it has no CUDA."""
    try:
        ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return False
    return True


def make_encoder(weights: ModelWeights, use_gpu: bool = False) -> Encoder:
    """A CUDA encoder when a GPU was given (and CUDA works), the numpy CPU encoder otherwise."""
    if not use_gpu or not cuda_driver_loads():
        return Encoder(weights)
    import torch

    device = choose_device(use_gpu, torch.cuda.is_available())
    return TorchEncoder(weights, device) if device == "cuda" else Encoder(weights)


# What builds each model's encoder in an encode stage: ``make_encoder``, or a benchmark's stand-in. Ray pickles it into
# the encoder actors, so it is a module-level function or a picklable object.
EncoderFactory = Callable[[ModelWeights, bool], Encoder]
