"""The seam between what a run does and where it runs.

An :class:`Executor` runs the work of every dataset: the datasets load in worker threads (see
:mod:`rqvae_ray.pipeline.jobs`) while the main thread starts the executor; then each dataset streams its blocks
through the encode stage to its writer, through the executor's :class:`DatasetStream`. Whichever executor runs, the
same stage and the same writer make the same bytes; a failure of one model or dataset never stops the others.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

from rqvae_ray.errors import Cancelled, RayConnectionLost, RqvaeRayError, reason_of
from rqvae_ray.inputs.model_ids import ModelSpec, group_by_dataset
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import commit_dataset, repo_files
from rqvae_ray.pipeline.jobs import Loaded, commit_message, dataset_output, interrupted, load_dataset
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.pipeline.results import ModelResult

# How long an interrupted run waits for its datasets to stop and drop their unfinished files.
CANCEL_WAIT_S = 5.0
# The same after the Ray cluster is lost: a dataset in a call to it never returns, and one that is working in this
# process at that moment (publishing a file, say) needs far less.
LOST_CLUSTER_WAIT_S = 1.0
# Above this many SID rows (POIs to encode x models) ``auto`` starts a private Ray rather than working in this
# process. Measured on a 2-core machine (``python -m benchmarks w2``, 2026-12-05): at 10 M SID rows this process is
# still ahead in both formats (Parquet 111.1 s vs 138.6 s on Ray, CSV 132.9 s vs 207.1 s, with a third of the memory),
# and on 2 cores it streams faster than Ray's actors at any size. But a quarter to a third of its work is serial (one
# core vs two at 500k x 5: Parquet 49.9 vs 31.7 s, CSV 58.6 vs 39.3 s), which caps it at 3-4x one core however many
# there are, while Ray's actors scale with the cores: past the largest size measured here, Ray.
LOCAL_MAX_SID_ROWS = 10_000_000


class DatasetStream(ABC):
    """What an executor does for one dataset: open its writer, stream the blocks through the encode stage to it,
    then finish (publish), upload, or abort."""

    @abstractmethod
    def open(self, output: DatasetOutput) -> None: ...

    @abstractmethod
    def stream(self, loaded: Loaded, options: RunOptions, progress: Progress) -> Iterator[int]:
        """Encode and write the rows from ``loaded.first_pid`` on; yields the rows written so far, block by block."""

    @abstractmethod
    def finish(self) -> list[Published | Refused]: ...

    @abstractmethod
    def upload(self, message: str, retries: int, backoff_s: float) -> str: ...

    @abstractmethod
    def abort(self, keep_resume: bool) -> None: ...


class Executor(ABC):
    """Runs the datasets of a run: started from the main thread, then one :class:`DatasetStream` per dataset."""

    @abstractmethod
    def prepare(self) -> None:
        """What :meth:`start` needs that must not wait behind the datasets' loading (called from the main thread before
        they load, when the executor is known by then)."""

    @abstractmethod
    def start(self) -> None:
        """Get ready (called from the main thread, while the datasets load)."""

    @abstractmethod
    def dataset(self, datasets: int) -> DatasetStream:
        """The stream of one dataset, ``datasets`` running at once."""

    def wait(self, futures: list[Future]) -> None:
        """Wait (in the main thread) for the datasets to finish."""
        while wait(futures, timeout=1.0).not_done:
            pass

    @abstractmethod
    def close(self) -> None:
        """Release what the run held once every dataset is done."""

    @abstractmethod
    def abandon(self) -> None:
        """The run stops early (an error, Ctrl-C, a lost cluster) while datasets may still be in the executor's calls:
        give back what this process's settings hold."""


def choose_executor(options: RunOptions, sid_rows: int | None) -> tuple[ExecutorMode, str] | None:
    """Which executor runs and why; None when ``auto`` needs the number of SID rows to encode (not known yet)."""
    if options.executor is not ExecutorMode.AUTO:
        return options.executor, f"--executor {options.executor.value}"
    if options.address:
        return ExecutorMode.RAY, f"the cluster at --address {options.address}"
    if os.environ.get("RAY_ADDRESS"):
        return ExecutorMode.RAY, "the cluster at RAY_ADDRESS"
    if options.pools.gpus_per_actor:
        return ExecutorMode.RAY, "GPUs are asked for"
    if sid_rows is None:
        return None
    if sid_rows > LOCAL_MAX_SID_ROWS:
        return (
            ExecutorMode.RAY,
            f"{sid_rows:,} SID rows; past {LOCAL_MAX_SID_ROWS:,} a private Ray, whose actors scale with the cores",
        )
    return ExecutorMode.LOCAL, (
        f"{sid_rows:,} SID rows; a private Ray's start-up would cost more than the work; --executor ray to use it"
    )


def run_datasets(
    specs: list[ModelSpec],
    options: RunOptions,
    progress: Progress,
    pick: Callable[[int | None], Executor | None],
) -> list[ModelResult]:
    """Run all models, datasets at once; returns results in input order.

    ``pick(None)`` gives the executor when it is known before loading; otherwise ``pick(sid_rows)`` once every
    dataset has loaded. On KeyboardInterrupt every dataset stops at its next block and drops its unfinished files,
    and the interrupt propagates; published outputs stay.
    """
    groups = group_by_dataset(specs)
    executor = pick(None)
    if executor is not None:
        executor.prepare()
    cancel = threading.Event()
    started: Future = Future()
    sizes = [Future() for _ in groups]
    pool = ThreadPoolExecutor(max_workers=len(groups))
    streams: dict[int, DatasetStream] = {}  # each dataset's stream, once it has one
    futures = [
        pool.submit(
            _run_dataset,
            f"{org}/{dataset}",
            group,
            options,
            progress,
            len(groups),
            cancel,
            size,
            started,
            functools.partial(streams.__setitem__, index),
        )
        for index, (((org, dataset), group), size) in enumerate(zip(groups.items(), sizes, strict=True))
    ]
    try:
        try:
            if executor is None:
                while wait(sizes, timeout=1.0).not_done:
                    pass
                executor = pick(sum(size.result() for size in sizes))
                executor.prepare()
            executor.start()
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result(executor)
        executor.wait(futures)
        by_id = {r.model_id: r for f in futures for r in f.result()}
    except BaseException as exc:
        cancel.set()
        progress.stopping()
        # Each dataset stops at its next block and drops its unfinished files; a dataset stuck in a call to the
        # executor (waiting for its first block, or a lost cluster) is not waited for long.
        waited_s = LOST_CLUSTER_WAIT_S if isinstance(exc, RayConnectionLost) else CANCEL_WAIT_S
        stuck = wait(futures, timeout=waited_s).not_done
        if isinstance(exc, KeyboardInterrupt):  # the executor still answers: a stuck dataset's files are dropped here
            for index, stream in list(streams.items()):
                if futures[index] in stuck:
                    stream.abort(keep_resume=True)
        pool.shutdown(wait=False, cancel_futures=True)
        if executor is not None:
            executor.abandon()
        raise
    pool.shutdown()
    executor.close()
    return [by_id[s.model_id] for s in specs]


def _run_dataset(
    repo: str,
    specs: list[ModelSpec],
    options: RunOptions,
    progress: Progress,
    datasets: int,
    cancel: threading.Event,
    size: Future,
    started: Future,
    opened: Callable[[DatasetStream], None],
) -> list[ModelResult]:
    """Run every model of one dataset; never raises for model or dataset problems."""
    begun = time.monotonic()
    try:
        loaded = load_dataset(repo, specs, options, progress)
    except RqvaeRayError as exc:
        size.set_result(0)
        return [ModelResult(s.model_id, s.dataset_repo, ok=False, error=str(exc)) for s in specs]
    except BaseException:
        size.set_result(0)
        raise
    size.set_result(loaded.sid_rows)
    results = loaded.results
    if loaded.ready or loaded.as_is:
        stream = started.result().dataset(datasets)
        opened(stream)
        for result in run_dataset(loaded, options, progress, cancel, stream):
            results[result.model_id] = result
    elapsed = time.monotonic() - begun
    for result in results.values():
        result.dataset_seconds = elapsed
    return [results[s.model_id] for s in specs]


def run_dataset(
    loaded: Loaded, options: RunOptions, progress: Progress, cancel: threading.Event, stream: DatasetStream
) -> list[ModelResult]:
    """Encode and write the models to run of one loaded dataset through ``stream`` and, when uploading, commit their
    files with the up-to-date ones the repo lacks (``loaded.as_is``) in one commit; one result per model of either."""
    features, ready = loaded.features, loaded.ready
    repo, pois, models = features.repo, features.num_pois, len(ready)
    failure, commit = "", ""
    finished: list[Published | Refused] = []
    try:
        if cancel.is_set():  # stopped while this dataset loaded: it starts nothing on the executor
            raise Cancelled(repo)
        if ready:
            stream.open(dataset_output(loaded, options))
            progress.dataset_started(repo, pois, models)
            if loaded.first_pid <= pois:
                for rows in stream.stream(loaded, options, progress):
                    if cancel.is_set():
                        raise Cancelled(repo)
                    progress.rows_written(repo, rows, pois, models)
            finished = stream.finish()
            progress.dataset_finished(repo, pois, models)
        published = [f for f in finished if isinstance(f, Published)]
        if options.upload and (published or loaded.as_is):
            done = {f.model_id for f in published}
            committed = [r for r in ready if r.spec.model_id in done] + [a.model for a in loaded.as_is]
            progress.note(f"{repo}: uploading the files of {len(committed)} model(s) in one commit")
            message = commit_message(features, committed)
            retries, backoff_s = options.upload_retries, options.retry_backoff_s
            if loaded.folder is None:  # the files are in the writer's temporary folder, wherever the writer runs
                commit = stream.upload(message, retries, backoff_s)
            else:  # the output folder is on this node: the finished files and the up-to-date ones go together
                entries = [f.entry for f in published] + [a.entry for a in loaded.as_is]
                files = repo_files(loaded.folder, options.base_folder, entries)
                commit = commit_dataset(repo, options.base_folder, entries, message, retries, backoff_s, files)
            progress.note(f"{repo}: uploaded as commit {commit}")
    # The dataset's boundary: whatever went wrong (ours, the executor's, or a bug) is these models' failure, found by
    # class along the executor's wrapping; the other datasets carry on.
    except Exception as exc:  # noqa: BLE001
        failure = reason_of(exc)
        if ready:
            stream.abort(interrupted(exc))
    by_model = {f.model_id: f for f in finished}
    results = []
    for item in ready:
        result = ModelResult(item.spec.model_id, item.spec.dataset_repo, ok=not failure, error=failure)
        done = by_model.get(item.spec.model_id)
        if isinstance(done, Refused):
            result.ok, result.error = False, done.reason
        elif done is not None:
            if item.existing is not None and item.existing.verify:
                progress.note(
                    f"{item.spec.model_id}: no POI of the {item.existing.rows} kept changed its SID; extended "
                    f"{done.entry.file}"
                )
            result.rows, result.sha256, result.quality = done.entry.rows, done.entry.sha256, done.entry.sid_stats
            result.exports = done.entry.exports
            result.encode_seconds = done.entry.encode_seconds
            result.path = done.path if options.out_dir is not None else ""
            result.commit = commit
        results.append(result)
    for item in loaded.as_is:
        spec, entry = item.model.spec, item.entry
        result = ModelResult(spec.model_id, spec.dataset_repo, ok=not failure, error=failure)
        if not failure:
            result.rows, result.sha256, result.quality = entry.rows, entry.sha256, entry.sid_stats
            result.exports = entry.exports
            result.path, result.commit = str(item.path), commit
        results.append(result)
    return results
