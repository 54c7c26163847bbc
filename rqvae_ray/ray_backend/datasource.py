"""Where the POI rows enter Ray, in blocks of exactly ``block_rows`` POIs in Pid order: rows in memory of a size the
object store takes at once are put there by this process (no read task); larger ones, and Parquet shards, through a
Ray Data datasource with one read task per piece of :func:`rqvae_ray.inputs.blocks.pieces` (a Parquet shard, or a few
blocks of rows in memory).

The driver already knows every shard's rows (it checked their Pids), so the read tasks come with their metadata and
yield blocks of the batch size themselves: no file listing or footer reading by Ray Data, and no repartition step but
the one :func:`~rqvae_ray.ray_backend.plan.task_rows` asks for. Parquet is read on the driver's node, where the files
are, by tasks that reserve no CPU (see :func:`~rqvae_ray.ray_backend.executor.build_dataset`).
"""

from __future__ import annotations

from ray.data import Datasource

from rqvae_ray.inputs.blocks import Piece, iter_blocks, pieces
from rqvae_ray.inputs.features import PoiFeatures
from rqvae_ray.ray_backend import compat

# Rows in memory up to this size go into the object store at once, from this process: the worker process of a read
# task costs ~1.5 CPU-seconds to start (W1 on Ray, 2 cores, medians of 5: 9.1 s instead of 10.9 s, 9.7 s instead of
# 10.1 s). Larger ones go through read tasks, a few at a time, so that the store never holds them all.
UP_FRONT_BYTES = 64 << 20


def poi_dataset(features: PoiFeatures, block_rows: int, start_pid: int = 1, reads_without_cpu: int | None = None):
    """A Ray Dataset of the rows of Pids ``start_pid``..N in order, in blocks of ``block_rows`` POIs; with
    ``reads_without_cpu``, read tasks that reserve no CPU, at most that many at once."""
    if features.rows is not None and features.rows.nbytes <= UP_FRONT_BYTES:
        return compat.from_blocks(list(iter_blocks(features, block_rows, start_pid)))
    source = _PoiSource(pieces(features, block_rows, start_pid))
    # As many blocks as read tasks: each task already yields batch-size blocks, which Ray Data would otherwise split
    # again to reach its default of 200 blocks (tiny blocks, each a task, a transfer and a write).
    return compat.read_on_this_node(source, len(source.pieces), bool(features.shards), reads_without_cpu)


class _PoiSource(Datasource):
    """One read task per piece, each with its row count."""

    def __init__(self, found: list[Piece]) -> None:
        self.pieces = found

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        return [compat.read_task(piece.read, piece.rows, per_task_row_limit) for piece in self.pieces]
