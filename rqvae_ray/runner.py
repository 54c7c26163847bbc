"""Runs a list of models on the executor the options choose (see :func:`rqvae_ray.pipeline.executor.choose_executor`)
and stops, at the end of the process, what it started."""

from __future__ import annotations

import os
import threading
from typing import NoReturn

from rqvae_ray.inputs.model_ids import ModelSpec
from rqvae_ray.pipeline.executor import Executor, choose_executor, run_datasets
from rqvae_ray.pipeline.local import LocalExecutor
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.pipeline.results import ModelResult

# How long a run waits for Ray to shut down before it exits anyway.
SHUTDOWN_WAIT_S = 15.0
_ray_started = threading.Event()


def run_models(specs: list[ModelSpec], options: RunOptions, progress: Progress | None = None) -> list[ModelResult]:
    """Run every model (datasets at once); returns one result per model, in input order."""
    progress = progress or Progress()

    def pick(sid_rows: int | None) -> Executor | None:
        chosen = choose_executor(options, sid_rows)
        if chosen is None:
            return None
        mode, why = chosen
        if mode is ExecutorMode.LOCAL:
            progress.note(f"executor: in this process ({why})")
            return LocalExecutor()
        from rqvae_ray.ray_backend.executor import RayExecutor

        progress.note(f"executor: Ray ({why})")
        _ray_started.set()
        return RayExecutor(options.address, options.output.fmt)

    return run_datasets(specs, options, progress, pick)


def begin_shutdown() -> threading.Event:
    """Start stopping what runs of this process started (Ray, when it ran on Ray) in the background; the event is
    set when done."""
    if not _ray_started.is_set():
        done = threading.Event()
        done.set()
        return done
    from rqvae_ray.ray_backend.cluster import begin_stopping_ray

    return begin_stopping_ray()


def end_process_now(code: int) -> NoReturn:
    """End this process at once with status ``code``, threads of a stopped run possibly still inside Ray calls: a
    private Ray's processes are killed once it has ended (see
    :func:`rqvae_ray.ray_backend.cluster.kill_private_ray_at_exit`); a joined cluster sees this process end and ends
    its work."""
    if _ray_started.is_set():
        from rqvae_ray.ray_backend.cluster import kill_private_ray_at_exit

        kill_private_ray_at_exit()
    os._exit(code)
