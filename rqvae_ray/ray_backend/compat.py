"""The Ray and Ray Data APIs that change between versions, each in one place. Tested with Ray 2.60."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


def read_task(read: Callable[[], Iterator], rows: int, per_task_row_limit: int | None):
    """A read task of known row count (``Datasource.get_read_tasks`` takes ``per_task_row_limit`` and
    ``data_context`` since Ray 2.5x; ``BlockMetadata`` lost its ``schema`` field in 2.4x)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import ReadTask

    meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=None)
    return ReadTask(read, meta, per_task_row_limit=per_task_row_limit)


def read_on_this_node(source, blocks: int, this_node_only: bool, reads_without_cpu: int | None = None):
    """``read_datasource`` with exactly ``blocks`` blocks, its tasks pinned to the driver's node when
    ``this_node_only`` (label selectors, and the ``ray.io/node-id`` label every node carries: Ray 2.50+); with
    ``reads_without_cpu``, tasks that reserve no CPU, at most that many at once."""
    import ray

    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()} if this_node_only else None
    limits = {} if reads_without_cpu is None else {"num_cpus": 0, "concurrency": reads_without_cpu}
    return ray.data.read_datasource(source, label_selector=here, override_num_blocks=blocks, **limits)


def from_blocks(blocks: list):
    """A dataset of exactly these blocks, put into the object store by this process with their metadata computed here,
    so that no task runs (``ray.data.from_blocks``, a DeveloperAPI in Ray 2.60; ``from_arrow`` runs a task per block
    for its metadata)."""
    import ray.data

    return ray.data.from_blocks(blocks)


def cut_blocks(ds, rows: int):
    """``ds`` with its blocks cut (or joined) into blocks of ``rows`` rows, in order: Ray Data's streaming repartition
    (``Dataset.repartition(target_num_rows_per_block=...)``, experimental in Ray 2.60; its tasks take a CPU each)."""
    return ds.repartition(target_num_rows_per_block=rows)


@contextlib.contextmanager
def block_refs(ds) -> Iterator[Iterator[tuple[object, tuple[int, int] | None]]]:
    """The output blocks of ``ds`` in order, as object references, with the rows of each to take (a block may be
    shared by two bundles as slices: ``iter_internal_ref_bundles`` and ``RefBundle.slices``, Ray 2.5x-2.60).

    Closed on the way out, error or not: an iterator left open (a failed dataset's error holds its consumer's frame)
    keeps Ray Data's execution and its actors alive, and later pools wait for them. An early end also collects once:
    the callbacks of a task still in flight hold its actor's handle in a reference cycle (Ray Data 2.60: DeferredEmit
    -> DataOpTask), so the actor kept its CPU until the collector next ran (11 of 34 early ends of a probe pipeline)."""
    blocks = _ordered_refs(ds)
    try:
        yield blocks
    except BaseException:
        blocks.close()
        gc.collect()
        raise
    else:
        blocks.close()


def _ordered_refs(ds) -> Iterator[tuple[object, tuple[int, int] | None]]:
    for bundle in ds.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
            yield entry.ref, (part.start_offset, part.end_offset) if part is not None else None


def _local_node_processes() -> dict[str, list]:
    """``ray._private.worker._global_node.all_processes`` (private, Ray 2.4x-2.60): process type -> the processes of
    the local Ray node this process started; empty when it joined a cluster."""
    from ray._private import worker

    return getattr(worker._global_node, "all_processes", {})


def local_node_pids() -> set[int]:
    """The processes (GCS, raylet, agents, ...) of the local Ray node this process started; none when it joined a
    cluster."""
    return {info.process.pid for infos in _local_node_processes().values() for info in infos}


def local_monitor_pids() -> set[int]:
    """The autoscaler monitor of the local Ray node this process started (process type ``monitor``, Ray 2.60); none
    when it joined a cluster."""
    from ray._private import ray_constants

    return {info.process.pid for info in _local_node_processes().get(ray_constants.PROCESS_TYPE_MONITOR, [])}
