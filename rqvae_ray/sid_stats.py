"""SID statistics accumulated in streaming fashion: memory depends on the codebook sizes, never on the POI count."""

from __future__ import annotations

import math

import numpy as np

# Up to this many possible SIDs the counts live in one dense array (64**3 = 262,144 for TKY); beyond it, in a dict
# keyed by the SIDs actually seen.
DENSE_LIMIT = 1 << 24


def pack_codes(codes: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """One int64 per row: the codes read as digits with the codebook sizes as bases."""
    packed = np.zeros(len(codes), dtype=np.int64)
    for level, size in enumerate(sizes):
        packed = packed * size + codes[:, level]
    return packed


def unpack_codes(packed: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    codes = np.empty((len(packed), len(sizes)), dtype=np.int64)
    rest = packed.copy()
    for level in range(len(sizes) - 1, -1, -1):
        codes[:, level] = rest % sizes[level]
        rest //= sizes[level]
    return codes


class SidCounter:
    """Counts how many POIs got each SID."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = tuple(int(s) for s in sizes)
        self.space = math.prod(self.sizes)
        self.rows = 0
        self._dense = np.zeros(self.space, dtype=np.int64) if self.space <= DENSE_LIMIT else None
        self._sparse: dict[int, int] = {}
        # Per SID the next unused dedup code (max code given + 1), made on first use.
        self._next: dict[int, int] | np.ndarray | None = None

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed SIDs."""
        self.rows += len(packed)
        if self._dense is not None:
            np.add.at(self._dense, packed, 1)
            return
        values, counts = np.unique(packed, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self._sparse[value] = self._sparse.get(value, 0) + count

    def count_of(self, packed: np.ndarray) -> np.ndarray:
        """How many POIs share each given SID."""
        if self._dense is not None:
            return self._dense[packed]
        return np.array([self._sparse.get(v, 0) for v in packed.tolist()], dtype=np.int64)

    def _next_codes(self) -> dict[int, int] | np.ndarray:
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
        keys = np.array(sorted(self._sparse), dtype=np.int64)
        return keys, np.array([self._sparse[k] for k in keys.tolist()], dtype=np.int64)

    def summary(self) -> dict:
        """Quality figures: unique SIDs, collisions, per-level usage and perplexity, shared prefixes."""
        sids, counts = self.items()
        collided = counts > 1
        codes = unpack_codes(sids, self.sizes)
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
        for length in range(1, len(self.sizes) + 1):
            prefix = codes[:, :length]
            if len(prefix):
                _, inverse = np.unique(prefix, axis=0, return_inverse=True)
                per_prefix = np.bincount(inverse.ravel(), weights=counts)
                shared = int(per_prefix[per_prefix > 1].sum())
            else:
                shared = 0
            shared_prefix[str(length)] = shared
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
