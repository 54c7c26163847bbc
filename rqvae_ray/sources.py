"""Where the POI rows enter Ray: a Ray Data datasource whose read tasks yield blocks of exactly ``block_rows`` POIs
in Pid order, from the rows in memory (``poi_features.pt``) or straight from the Parquet shards.

The driver already knows every shard's rows (it checked their Pids), so the read tasks come with their metadata and
yield blocks of the batch size themselves: no file listing or footer reading by Ray Data, and no repartition step.
Parquet is read by tasks pinned to the driver's node, where the files are.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa
from ray.data import Datasource

from rqvae_ray.encoder import SparseRows
from rqvae_ray.features import PoiFeatures, row_slice, sparse_table


def poi_dataset(features: PoiFeatures, block_rows: int, start_pid: int = 1):
    """A Ray Dataset of the rows of Pids ``start_pid``..N in order, in blocks of ``block_rows`` POIs."""
    import ray

    source = _PoiSource(features, block_rows, start_pid)
    # Parquet is read on the driver's node, where the files are (every Ray node carries its ID as a label).
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()} if features.shards else None
    # As many blocks as read tasks: each task already yields batch-size blocks, which Ray Data would otherwise split
    # again to reach its default of 200 blocks (tiny blocks, each a task, a transfer and a write).
    return ray.data.read_datasource(source, label_selector=here, override_num_blocks=source.task_count())


def _memory_blocks(rows: SparseRows, before: int, block_rows: int) -> Iterator[pa.Table]:
    """``rows`` (the dataset's rows after its first ``before``) as sparse tables of ``block_rows`` rows."""
    for first in range(0, rows.num_rows, block_rows):
        last = min(first + block_rows, rows.num_rows)
        yield sparse_table(row_slice(rows, first, last), first_pid=before + first + 1)


def _shard_blocks(path: str, skip: int, block_rows: int) -> Iterator[pa.Table]:
    """The rows of one Parquet shard after its first ``skip``, as tables of ``block_rows`` rows."""
    import pyarrow.parquet as pq

    pending: list[pa.Table] = []
    held = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=block_rows):
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


class _PoiSource(Datasource):
    """One read task per shard (Parquet) or per run of blocks (rows in memory), each with its row count."""

    # Blocks of in-memory rows per read task: a task's rows travel with it, so tasks stay a few MB.
    MEMORY_BLOCKS_PER_TASK = 4

    def __init__(self, features: PoiFeatures, block_rows: int, start_pid: int) -> None:
        self.features = features
        self.block_rows = block_rows
        self.start = start_pid - 1  # rows before this one are not read

    def task_count(self) -> int:
        return sum(1 for _ in (self._shard_spans() if self.features.shards else self._memory_spans()))

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        tasks = []
        for count, read in self._pieces():
            meta = BlockMetadata(num_rows=count, size_bytes=None, exec_stats=None, input_files=None)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def _pieces(self):
        """(rows, read function) of each read task, in Pid order."""
        block_rows = self.block_rows
        if not self.features.shards:
            for first, last in self._memory_spans():
                part = _task_rows(self.features.rows, first, last)
                yield last - first, lambda p=part, f=first: _memory_blocks(p, f, block_rows)
            return
        for path, skip, count in self._shard_spans():
            yield count, lambda p=path, s=skip: _shard_blocks(p, s, block_rows)

    def _memory_spans(self) -> Iterator[tuple[int, int]]:
        """(first, last + 1) row of each read task of rows in memory."""
        span, total = self.block_rows * self.MEMORY_BLOCKS_PER_TASK, self.features.num_pois
        for first in range(self.start, total, span):
            yield first, min(first + span, total)

    def _shard_spans(self) -> Iterator[tuple[str, int, int]]:
        """(path, rows skipped, rows read) of each shard read, from the first row needed."""
        ends = [*self.features.shard_first_pids[1:], self.features.num_pois + 1]
        for path, first_pid, end in zip(self.features.shards, self.features.shard_first_pids, ends, strict=True):
            first, count = first_pid - 1, end - first_pid
            if first + count > self.start:
                skip = max(0, self.start - first)
                yield path, skip, count - skip


def _task_rows(rows: SparseRows, first: int, last: int) -> SparseRows:
    """Rows ``first``..``last - 1`` on their own (copied, so that a read task carries only its rows)."""
    part = row_slice(rows, first, last)
    return SparseRows(part.indptr, part.indices.copy(), None if part.values is None else part.values.copy())
