"""The cap on POIs per SID (``--max-per-sid K``): which POIs leave an SID held by more than K, and where they go.

The rule, decided once every SID is counted, so that it never depends on the batches:

* The distance of a residual ``r`` to a codeword ``c`` is ``sum_j (r_j - c_j)**2`` in float64, added in ascending
  dimension order; residuals are ``r_0 = z`` and ``r_l = r_(l-1) - C_l[i_l]`` (the float64 codewords subtracted level
  by level, as the encoder does). A POI's *error* is the distance of ``r_(L-1)`` to its last codeword (its
  ``|z - q|**2``).
* In an SID held by more than K POIs, the POIs kept from an existing file stay, then the new POIs in ascending
  (error, Pid) fill the places left up to K; the others are *movers*.
* Movers are placed one at a time in ascending (error, Pid) over all SIDs. A mover keeps the longest prefix of its
  codes under which some SID has room (fewer than K POIs); below it, each level takes the nearest codeword (ties to
  the lower index) under which some SID still has room, the last level the nearest SID with room. Its new error
  minus its old one is its *extra distance*.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from rqvae_ray.core.sid_stats import DENSE_LIMIT, SidCounter, sid_layout
from rqvae_ray.errors import OutputError

# Rows of SIDs read at a time while the over-full SIDs are found.
SCAN_ROWS = 1 << 20


def room_problem(sizes: tuple[int, ...], max_per_sid: int, pois: int) -> str:
    """Why ``pois`` POIs cannot all be placed with at most ``max_per_sid`` per SID of ``sizes``; "" when they can."""
    room = max_per_sid * math.prod(sizes)
    if pois <= room:
        return ""
    return (
        f"--max-per-sid {max_per_sid} leaves room for {room:,} POIs ({math.prod(sizes):,} SIDs) but there are "
        f"{pois:,}; raise --max-per-sid"
    )


def latent_array(latent: np.ndarray) -> pa.Array:
    """The encoder's outputs ``[n, d]`` (float64) as an Arrow column, one fixed-size list per row."""
    return pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(latent, dtype=np.float64).ravel()), latent.shape[1]
    )


def latent_values(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ``[n, d]`` float64 array of a column made by :func:`latent_array`."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), values.type.list_size)


def distances(residuals: np.ndarray, book: np.ndarray) -> np.ndarray:
    """``[n, k]``: the distance of each residual ``[n, d]`` to each codeword of ``book`` ``[k, d]`` (float64)."""
    squares = np.square(residuals[:, None, :] - book[None, :, :])
    # cumsum adds strictly in order, so the last partial sum is the sum in ascending dimension order.
    return np.cumsum(squares, axis=2)[:, :, -1]


def residuals_after(latent: np.ndarray, codes: np.ndarray, books: tuple[np.ndarray, ...], levels: int) -> np.ndarray:
    """``r_levels`` of each row: ``latent`` less its first ``levels`` float64 codewords, subtracted in order."""
    residual = np.array(latent, dtype=np.float64)
    for level in range(levels):
        residual -= books[level][codes[:, level]]
    return residual


def quantization_errors(latent: np.ndarray, codes: np.ndarray, books: tuple[np.ndarray, ...]) -> np.ndarray:
    """Each row's error: the distance of ``r_(L-1)`` to its last codeword (float64 ``books``, ``codes`` ``[n, L]``)."""
    final = residuals_after(latent, codes, books, len(books))
    # r_L = r_(L-1) - c element by element, so its squares are the distance's terms.
    return np.cumsum(np.square(final), axis=1)[:, -1]


def movers(sids: np.ndarray, row_errors: np.ndarray, counter: SidCounter, max_per_sid: int) -> np.ndarray:
    """The rows of ``sids`` (the new POIs' packed SIDs, in Pid order; ``counter`` counts them and any kept POIs) that
    leave their SID, in the order they move: ascending (error, row)."""
    over = [
        start + np.flatnonzero(counter.count_of(np.asarray(sids[start : start + SCAN_ROWS])) > max_per_sid)
        for start in range(0, len(sids), SCAN_ROWS)
    ]
    rows = np.concatenate([np.zeros(0, dtype=np.int64), *over])
    if not len(rows):
        return rows
    groups, group_of, new = np.unique(np.asarray(sids[rows]), return_inverse=True, return_counts=True)
    group_of = group_of.ravel()
    kept = counter.count_of(groups) - new  # POIs of an existing file: they stay and count toward the cap
    places = np.maximum(max_per_sid - kept, 0)
    row_errors = np.asarray(row_errors[rows])
    order = np.lexsort((rows, row_errors, group_of))
    starts = np.r_[0, np.cumsum(new)[:-1]]
    rank = np.arange(len(rows)) - starts[group_of[order]]
    moving = order[rank >= places[group_of[order]]]
    return rows[moving[np.lexsort((rows[moving], row_errors[moving]))]]


class _Tally:
    """A count per key of ``space`` possible keys: a dense array when small enough, else a dict."""

    def __init__(self, space: int) -> None:
        self._dense = np.zeros(space, dtype=np.int64) if space <= DENSE_LIMIT else None
        self._sparse: dict[int | tuple, int] = {}

    def add(self, keys: np.ndarray) -> None:
        if self._dense is not None:
            np.add.at(self._dense, keys, 1)
            return
        for key in keys.tolist():
            self._sparse[key] = self._sparse.get(key, 0) + 1

    def get(self, key: np.ndarray) -> int:
        """The count of one key (a packed prefix, as an array of one)."""
        if self._dense is not None:
            return int(self._dense[key[0]])
        return self._sparse.get(key.tolist()[0], 0)


class Placement:
    """Where movers go: the SID counts (``counter``, without the movers) and, per prefix of every length below the
    levels, how many of the SIDs under it are full."""

    def __init__(self, counter: SidCounter, books: tuple[np.ndarray, ...], max_per_sid: int) -> None:
        self.counter = counter
        self.books = books
        self.max_per_sid = max_per_sid
        self.sizes = counter.sizes
        self.levels = len(self.sizes)
        self._prefix_layouts = [sid_layout(self.sizes[:length]) for length in range(self.levels)]
        self._full = [_Tally(math.prod(self.sizes[:length])) for length in range(self.levels)]
        self._capacity = [math.prod(self.sizes[length:]) for length in range(self.levels)]
        sids, counts = counter.items()
        self._count_full(counter.layout.unpack(sids[counts >= max_per_sid]))

    def _count_full(self, codes: np.ndarray) -> None:
        for length, tally in enumerate(self._full):
            tally.add(self._prefix_layouts[length].pack(codes))

    def _has_room(self, prefix: list[int]) -> bool:
        """Whether some SID under ``prefix`` (shorter than the levels, or a whole SID) holds fewer than K POIs."""
        codes = np.array([prefix], dtype=np.int64)
        if len(prefix) == self.levels:
            return int(self.counter.count_of(self.counter.layout.pack(codes))[0]) < self.max_per_sid
        full = self._full[len(prefix)].get(self._prefix_layouts[len(prefix)].pack(codes))
        return full < self._capacity[len(prefix)]

    def place(self, latent: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, float]:
        """The new codes of a mover (its latent ``[d]`` and old codes ``[L]``) and its new error; counts it there."""
        old = [int(code) for code in codes]
        keep = next((length for length in range(self.levels - 1, -1, -1) if self._has_room(old[:length])), None)
        if keep is None:
            raise OutputError(f"--max-per-sid {self.max_per_sid}: every SID is full; raise --max-per-sid")
        chosen = old[:keep]
        residual = residuals_after(latent[None, :], codes[None, :], self.books, keep)
        for level in range(keep, self.levels):
            nearest = np.argsort(distances(residual, self.books[level])[0], kind="stable")
            code = next(int(c) for c in nearest if self._has_room([*chosen, int(c)]))
            chosen.append(code)
            residual -= self.books[level][code]
        new = np.array([chosen], dtype=np.int64)
        packed = self.counter.layout.pack(new)
        self.counter.add(packed)
        if int(self.counter.count_of(packed)[0]) == self.max_per_sid:
            self._count_full(new)
        error = float(np.cumsum(np.square(residual[0]))[-1])
        return new[0], error
