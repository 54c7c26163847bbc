"""SID statistics accumulated in streaming fashion: memory depends on the codebook sizes, never on the POI count.

A packed SID is the codes of a POI read as digits with the codebook sizes as bases. When the sizes multiply to at
most 2**63 that is one int64 (the common case); otherwise the levels are split into several int64 words, most
significant first, and a packed SID is one element of a structured dtype of those words (NumPy sorts, compares and
finds them field by field, so their order is still the lexicographic order of the codes).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pyarrow as pa

# Up to this many possible SIDs the counts live in one dense array (64**3 = 262,144 for TKY); beyond it, in a dict
# keyed by the SIDs actually seen.
DENSE_LIMIT = 1 << 24
# The most values one non-negative int64 word holds (0 .. 2**63 - 1).
WORD_VALUES = 1 << 63


class SidLayout:
    """How the SIDs of one set of codebook sizes are packed: the levels each int64 word holds."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self.groups = _word_groups(sizes)
        # The largest value each word can hold (the product of its sizes, less one: always an int64).
        self.word_max = np.array([math.prod(sizes[start:stop]) - 1 for start, stop in self.groups], dtype=np.int64)
        self.words = len(self.groups)
        self.wide = self.words > 1
        if self.wide:
            self.dtype = np.dtype([(f"w{word}", "<i8") for word in range(self.words)])
        else:
            self.dtype = np.dtype(np.int64)

    def pack(self, codes: np.ndarray) -> np.ndarray:
        """One packed SID per row of ``codes`` (``[n, levels]``; columns past the levels are ignored)."""
        words = np.zeros((len(codes), self.words), dtype=np.int64)
        for word, (start, stop) in enumerate(self.groups):
            for level in range(start, stop):
                if self.sizes[level] == WORD_VALUES:  # no int64 multiplier; its word holds 0 so far (see _word_groups)
                    words[:, word] = codes[:, level]
                else:
                    words[:, word] = words[:, word] * self.sizes[level] + codes[:, level]
        return self.from_words(words)

    def unpack(self, packed: np.ndarray) -> np.ndarray:
        """The codes ``[n, levels]`` (int64) of packed SIDs."""
        words = self.words_of(packed)
        codes = np.empty((len(words), len(self.sizes)), dtype=np.int64)
        for word, (start, stop) in enumerate(self.groups):
            rest = words[:, word].copy()
            for level in range(stop - 1, start - 1, -1):
                if self.sizes[level] == WORD_VALUES:
                    codes[:, level], rest = rest, np.zeros_like(rest)
                else:
                    codes[:, level] = rest % self.sizes[level]
                    rest //= self.sizes[level]
        return codes

    def words_of(self, packed: np.ndarray) -> np.ndarray:
        """The int64 words ``[n, words]`` of packed SIDs."""
        return np.ascontiguousarray(packed, dtype=self.dtype).view(np.int64).reshape(len(packed), self.words)

    def from_words(self, words: np.ndarray) -> np.ndarray:
        """Packed SIDs from their int64 words ``[n, words]``."""
        words = np.ascontiguousarray(words, dtype=np.int64).reshape(-1, self.words)
        return words[:, 0].copy() if not self.wide else words.view(self.dtype).reshape(len(words))

    def in_range(self, packed: np.ndarray) -> bool:
        """Whether every packed SID is one of these sizes (each word within its range)."""
        words = self.words_of(packed)
        return not len(words) or bool(((words >= 0) & (words <= self.word_max)).all())

    def from_arrow(self, values: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Packed SIDs from a column made by :func:`sid_array`; ValueError when its type is not of these sizes."""
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if not self.wide and values.type == pa.int64():
            return values.to_numpy(zero_copy_only=False)
        if self.wide and values.type == pa.list_(pa.int64(), self.words):
            return self.from_words(values.flatten().to_numpy(zero_copy_only=False))
        raise ValueError(f"packed SIDs of type {values.type} do not fit codebook sizes {self.sizes}")


def _word_groups(sizes: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The levels ``(start, stop)`` of each word: as many consecutive levels as fit, most significant first (a
    level of 2**63 codewords shares its word only with levels of one codeword, whose codes are 0)."""
    if any(size < 1 or size > WORD_VALUES for size in sizes):
        raise ValueError(f"codebook sizes {sizes} cannot be packed in int64 words")
    groups, start, product = [], 0, 1
    for level, size in enumerate(sizes):
        if product * size > WORD_VALUES:
            groups.append((start, level))
            start, product = level, 1
        product *= size
    groups.append((start, len(sizes)))
    return tuple(groups)


@functools.lru_cache(maxsize=256)
def sid_layout(sizes: tuple[int, ...]) -> SidLayout:
    """The packing of SIDs of codebook sizes ``sizes``."""
    return SidLayout(tuple(int(size) for size in sizes))


def sid_array(packed: np.ndarray) -> pa.Array:
    """Packed SIDs as an Arrow column: int64, or a fixed-size list of their int64 words when wide."""
    if packed.dtype.names is None:
        return pa.array(np.asarray(packed, dtype=np.int64))
    words = len(packed.dtype.names)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(packed).view(np.int64)), words)


def pack_codes(codes: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """One packed SID per row: the codes read as digits with the codebook sizes as bases (see :class:`SidLayout`)."""
    return sid_layout(tuple(sizes)).pack(codes)


def unpack_codes(packed: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    return sid_layout(tuple(sizes)).unpack(packed)


class SidCounter:
    """Counts how many POIs got each SID."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.layout = sid_layout(tuple(sizes))
        self.sizes = self.layout.sizes
        self.space = math.prod(self.sizes)
        self.rows = 0
        self._dense = np.zeros(self.space, dtype=np.int64) if self.space <= DENSE_LIMIT else None
        # Keyed by the packed SID as Python sees it: an int, or a tuple of words when wide.
        self._sparse: dict[int | tuple, int] = {}
        # Per SID the next unused dedup code (max code given + 1), made on first use.
        self._next: dict[int | tuple, int] | np.ndarray | None = None

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed SIDs (see :class:`SidLayout`)."""
        self.rows += len(packed)
        if self._dense is not None:
            np.add.at(self._dense, packed, 1)
            return
        values, counts = np.unique(packed, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self._sparse[value] = self._sparse.get(value, 0) + count

    def remove(self, packed: np.ndarray) -> None:
        """Uncount POIs counted before (they leave their SIDs)."""
        self.rows -= len(packed)
        if self._dense is not None:
            np.subtract.at(self._dense, packed, 1)
            return
        values, counts = np.unique(packed, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            left = self._sparse[value] - count
            if left:
                self._sparse[value] = left
            else:
                del self._sparse[value]

    def count_of(self, packed: np.ndarray) -> np.ndarray:
        """How many POIs share each given SID."""
        if self._dense is not None:
            return self._dense[packed]
        return np.array([self._sparse.get(v, 0) for v in packed.tolist()], dtype=np.int64)

    def _next_codes(self) -> dict[int | tuple, int] | np.ndarray:
        if self._next is None:
            self._next = np.zeros(self.space, dtype=np.int64) if self._dense is not None else {}
        return self._next

    def next_code_of(self, packed: np.ndarray) -> np.ndarray:
        """The next unused dedup code of each given SID (0 where none was given)."""
        if self._next is None:
            return np.zeros(len(packed), dtype=np.int64)
        if isinstance(self._next, np.ndarray):
            return self._next[packed]
        return np.array([self._next.get(v, 0) for v in packed.tolist()], dtype=np.int64)

    def seed_codes(self, packed: np.ndarray, extra: np.ndarray) -> None:
        """Take the dedup codes ``extra`` (-1: none) that POIs of an existing file hold, so that codes given later
        continue after the largest one of each SID."""
        held = extra >= 0
        if not held.any():
            return
        sids, codes = packed[held], extra[held] + 1
        table = self._next_codes()
        if isinstance(table, np.ndarray):
            np.maximum.at(table, sids, codes)
            return
        for sid, code in zip(sids.tolist(), codes.tolist(), strict=True):
            table[sid] = max(table.get(sid, 0), code)

    def dedup_codes(self, packed: np.ndarray, fixed_length: bool = False) -> np.ndarray:
        """The extra code of each POI, -1 where it gets none; call in ascending Pid order after counting.

        POIs sharing an SID (every POI when ``fixed_length``) get the next unused codes of their SID, in the order
        they are passed: 0, 1, 2, ... as in the GNPR-SID authors' codebook.py, or after the codes seeded by
        :meth:`seed_codes`.
        """
        table = self._next_codes()
        extra = np.full(len(packed), -1, dtype=np.int64)
        shared = np.arange(len(packed)) if fixed_length else np.flatnonzero(self.count_of(packed) > 1)
        if not len(shared):
            return extra
        sids = packed[shared]
        order = np.argsort(sids, kind="stable")
        ordered = sids[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        sizes = np.diff(np.r_[starts, len(ordered)])
        rank = np.arange(len(ordered)) - np.repeat(starts, sizes)
        groups = ordered[starts]
        base = self.next_code_of(groups)
        if isinstance(table, np.ndarray):
            table[groups] += sizes
        else:
            for group, size in zip(groups.tolist(), sizes.tolist(), strict=True):
                table[group] = table.get(group, 0) + size
        values = np.empty(len(ordered), dtype=np.int64)
        values[order] = np.repeat(base, sizes) + rank
        extra[shared] = values
        return extra

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """The SIDs seen (ascending) and their counts."""
        if self._dense is not None:
            seen = np.flatnonzero(self._dense)
            return seen, self._dense[seen]
        keys = np.array(sorted(self._sparse), dtype=self.layout.dtype)
        return keys, np.array([self._sparse[k] for k in keys.tolist()], dtype=np.int64)

    def summary(self) -> dict:
        """Quality figures: unique SIDs, collisions, per-level usage and perplexity, shared prefixes."""
        sids, counts = self.items()
        collided = counts > 1
        codes = self.layout.unpack(sids)
        levels = []
        for level, size in enumerate(self.sizes):
            usage = np.bincount(codes[:, level], weights=counts, minlength=size) if len(sids) else np.zeros(size)
            probs = usage[usage > 0] / max(self.rows, 1)
            levels.append(
                {
                    "codebook_size": size,
                    "codewords_used": int((usage > 0).sum()),
                    "perplexity": float(np.exp(-(probs * np.log(probs)).sum())) if len(probs) else 0.0,
                    "usage": usage.astype(np.int64).tolist(),
                }
            )
        shared_prefix = {}
        for length, starts in enumerate(prefix_starts(codes), start=1):
            per_prefix = np.bincount(np.cumsum(starts) - 1, weights=counts) if len(codes) else np.zeros(0)
            shared_prefix[str(length)] = int(per_prefix[per_prefix > 1].sum())
        bucket_sizes, bucket_counts = np.unique(counts, return_counts=True) if len(counts) else ([], [])
        return {
            "pois": int(self.rows),
            "unique_sids": int(len(sids)),
            "collided_buckets": int(collided.sum()),
            "largest_bucket": int(counts.max()) if len(counts) else 0,
            "pois_in_collided_buckets": int(counts[collided].sum()),
            "levels": levels,
            "pois_sharing_prefix": shared_prefix,
            "bucket_size_histogram": {str(int(s)): int(c) for s, c in zip(bucket_sizes, bucket_counts, strict=True)},
        }


def prefix_starts(codes: np.ndarray) -> list[np.ndarray]:
    """For each prefix length 1..levels, which rows of ``codes`` ([n, levels], rows in ascending order, as
    :meth:`SidCounter.items` gives them) begin a new prefix of that length: the distinct prefixes are runs of rows, so
    no ``np.unique(axis=0)`` (ten times the cost) is needed."""
    starts, begins = [], np.zeros(len(codes), dtype=bool)
    begins[:1] = True
    for level in range(codes.shape[1]):
        begins = begins.copy()  # a longer prefix begins wherever a shorter one does, or where this level's code changes
        begins[1:] |= codes[1:, level] != codes[:-1, level]
        starts.append(begins)
    return starts
