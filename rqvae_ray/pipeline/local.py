"""The in-process executor: each dataset's blocks pass through the encode stage in this process's threads (the
encoder's float64 matrix products and pyarrow's kernels release the GIL) and go to its writer in Pid order.

The threads are one per core, so BLAS runs one thread per call while the run lasts (OpenBLAS's own threads, one
per core by default, would double the busy threads: a 250k x 5 Parquet run took 1.4x as long, its CPU time 1.4-1.5x).

For small jobs and tests: no Ray process is started, so a run costs its work and nothing more.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator

import pyarrow as pa
from threadpoolctl import threadpool_limits

from rqvae_ray.inputs.blocks import iter_blocks
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import DatasetWriter
from rqvae_ray.pipeline.executor import DatasetStream, Executor
from rqvae_ray.pipeline.jobs import Loaded, stage_models
from rqvae_ray.pipeline.options import RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.stages.encode import EncodeModels

# Blocks are at least this big, so that tiny batch sizes change only how often the stage is called.
MIN_BLOCK_ROWS = 256
# Blocks being encoded at once, per thread.
BLOCKS_PER_THREAD = 2


def local_threads() -> int:
    """Threads that encode each dataset's blocks: one per core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class LocalExecutor(Executor):
    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or local_threads()
        self._blas: threadpool_limits | None = None

    def prepare(self) -> None:
        """Nothing: the work needs nothing that loading would slow down."""

    def start(self) -> None:
        """Nothing to start (the work runs in this process) but BLAS's limit of one thread per call."""
        # From the main thread: threadpoolctl lets one thread at a time set OpenBLAS's limits, and ignores the others.
        self._blas = threadpool_limits(limits=1, user_api="blas")

    def close(self) -> None:
        """BLAS's own setting back; each dataset's threads end with it."""
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None

    def abandon(self) -> None:
        self.close()

    def dataset(self, datasets: int) -> DatasetStream:
        return _LocalStream(self.threads)


class _LocalStream(DatasetStream):
    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.writer: DatasetWriter | None = None

    def open(self, output: DatasetOutput) -> None:
        self.writer = DatasetWriter(output)

    def stream(self, loaded: Loaded, options: RunOptions, progress: Progress) -> Iterator[int]:
        progress.note(f"{loaded.repo}: in this process, {self.threads} thread(s) x {len(loaded.ready)} model(s)")
        models, spec = stage_models(loaded), options.output
        local = threading.local()

        def encode(block: pa.Table) -> pa.Table:
            stage = getattr(local, "stage", None)
            if stage is None:
                stage = local.stage = EncodeModels(
                    repo=loaded.repo, models=models, spec=spec, encoder_factory=options.encoder_factory
                )
            return stage(block)

        blocks = iter_blocks(loaded.features, max(options.batch_size, MIN_BLOCK_ROWS), loaded.first_pid)
        if self.threads == 1:
            for block in blocks:
                yield self.writer.write(encode(block))
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="rqvae_ray-encode") as pool:
            pending: deque = deque()
            try:
                for block in blocks:
                    pending.append(pool.submit(encode, block))
                    while len(pending) > self.threads * BLOCKS_PER_THREAD or (pending and pending[0].done()):
                        yield self.writer.write(pending.popleft().result())
                while pending:
                    yield self.writer.write(pending.popleft().result())
            finally:
                for future in pending:
                    future.cancel()

    def finish(self) -> list[Published | Refused]:
        return self.writer.finish()

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        return self.writer.upload(message, retries, backoff_s)

    def abort(self, keep_resume: bool) -> None:
        if self.writer is not None:
            self.writer.abort(keep_resume)
