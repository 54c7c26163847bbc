"""A digest of the POI features of rows 1..m, independent of the file format and of how the rows are blocked.

The rows are read in Pid order as three streams: each row's number of nonzero columns (uint32), the column indices
(int32, ascending within a row) and the values (float32; ones for multi-hot rows), all little-endian. The digest is
the sha256 of the three streams' sha256 digests, in that order. A `.pt` dataset and Parquet shards of the same rows
give the same digest, and so does a dataset that only appends rows after Pid m: the manifest records it for every
codebooks file, and ``--keep-existing`` compares it to tell whether the POIs already in a file still have the
features they were encoded from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.inputs.blocks import iter_rows
from rqvae_ray.inputs.features import PoiFeatures

BLOCK_ROWS = 65536


class _Streams:
    """The running sha256 of each of the three streams."""

    def __init__(self) -> None:
        self.hashes = [hashlib.sha256() for _ in range(3)]

    def update(self, rows: SparseRows) -> None:
        counts, indices, values = self.hashes
        counts.update(np.diff(rows.indptr).astype("<u4"))
        indices.update(np.asarray(rows.indices, dtype="<i4"))
        values.update(np.ones(len(rows.indices), "<f4") if rows.values is None else np.asarray(rows.values, "<f4"))

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(part.digest() for part in self.hashes)).hexdigest()


def rows_digests(features: PoiFeatures, counts: Iterable[int]) -> dict[int, str]:
    """The digest of rows 1..m for each m of ``counts`` (each between 0 and the number of POIs), in one pass."""
    pending = sorted(set(counts))
    streams, result, offset = _Streams(), {}, 0
    for block in iter_rows(features, BLOCK_ROWS):
        start = 0
        while pending and pending[0] - offset <= block.num_rows:
            stop = pending.pop(0) - offset
            streams.update(block.slice(start, stop))
            result[offset + stop] = streams.hexdigest()
            start = stop
        if not pending:
            break
        streams.update(block.slice(start, block.num_rows))
        offset += block.num_rows
    return result
