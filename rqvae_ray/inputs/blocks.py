"""The one reader of a dataset's rows in Pid order, as blocks of a fixed number of POIs: from the rows in memory
(``poi_features.pt``) or straight from the Parquet shards. Each executor reads through it: the in-process one calls
:func:`iter_blocks`, as the Ray executor does for rows in memory it puts into the object store itself; Ray's read
tasks each take one :func:`pieces` entry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.rows import rows_from_table, sparse_table
from rqvae_ray.errors import DatasetError
from rqvae_ray.inputs.features import PoiFeatures

# Blocks of in-memory rows per piece: a Ray read task's rows travel with it, so tasks stay a few MB.
MEMORY_BLOCKS_PER_PIECE = 4


@dataclass(frozen=True)
class Piece:
    """A run of consecutive rows that one reader yields as blocks: ``rows`` of them, read by ``read()``."""

    rows: int
    read: Callable[[], Iterator[pa.Table]]


def pieces(features: PoiFeatures, block_rows: int, first_pid: int = 1) -> list[Piece]:
    """The rows of Pids ``first_pid``..N in order, as pieces (one per Parquet shard, or per few blocks of rows in
    memory) whose reads yield tables of ``block_rows`` POIs (the last one of a piece may be shorter)."""
    start = first_pid - 1
    if features.shards:
        ends = [*features.shard_first_pids[1:], features.num_pois + 1]
        found = []
        for path, first, end in zip(features.shards, features.shard_first_pids, ends, strict=True):
            if end - 1 > start:
                skip = max(0, start - (first - 1))
                found.append(Piece(end - first - skip, lambda p=path, s=skip: shard_blocks(p, s, block_rows)))
        return found
    span, found = block_rows * MEMORY_BLOCKS_PER_PIECE, []
    for first in range(start, features.num_pois, span):
        last = min(first + span, features.num_pois)
        part = _own_rows(features.rows, first, last)
        found.append(Piece(last - first, lambda p=part, f=first: memory_blocks(p, f, block_rows)))
    return found


def iter_blocks(features: PoiFeatures, block_rows: int, first_pid: int = 1) -> Iterator[pa.Table]:
    """Every row from Pid ``first_pid`` on, in order, as tables of ``block_rows`` POIs."""
    for piece in pieces(features, block_rows, first_pid):
        yield from piece.read()


def iter_rows(features: PoiFeatures, block_rows: int) -> Iterator[SparseRows]:
    """Every row in Pid order as sparse rows, in blocks of at most ``block_rows`` rows."""
    if features.rows is not None:
        for start in range(0, features.num_pois, block_rows):
            yield features.rows.slice(start, min(start + block_rows, features.num_pois))
        return
    for table in iter_blocks(features, block_rows):
        try:
            yield rows_from_table(table)
        except DatasetError as exc:
            raise DatasetError(features.repo, exc.reason) from None


def memory_blocks(rows: SparseRows, before: int, block_rows: int) -> Iterator[pa.Table]:
    """``rows`` (the dataset's rows after its first ``before``) as sparse tables of ``block_rows`` rows."""
    for first in range(0, rows.num_rows, block_rows):
        last = min(first + block_rows, rows.num_rows)
        yield sparse_table(rows.slice(first, last), first_pid=before + first + 1)


def shard_blocks(path: str, skip: int, block_rows: int) -> Iterator[pa.Table]:
    """The rows of one Parquet shard after its first ``skip``, as tables of ``block_rows`` rows."""
    import pyarrow.parquet as pq

    pending: list[pa.Table] = []
    held = 0
    with pq.ParquetFile(path) as parquet:
        for batch in parquet.iter_batches(batch_size=block_rows):
            table = pa.Table.from_batches([batch])
            if skip:
                dropped = min(skip, table.num_rows)
                table, skip = table.slice(dropped), skip - dropped
            pending.append(table)
            held += table.num_rows
            while held >= block_rows:
                whole = pa.concat_tables(pending)
                yield whole.slice(0, block_rows).combine_chunks()
                pending, held = [whole.slice(block_rows)], held - block_rows
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def _own_rows(rows: SparseRows, first: int, last: int) -> SparseRows:
    """Rows ``first``..``last - 1`` on their own (copied, so that a Ray read task carries only its rows)."""
    part = rows.slice(first, last)
    return SparseRows(part.indptr, part.indices.copy(), None if part.values is None else part.values.copy())
