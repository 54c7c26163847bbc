"""The run's writer actor killed in the middle of a dataset: each of its models fails with one line that says to run
the same command again."""

from __future__ import annotations

import gc
import os
import threading
import time

from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.runner import run_models
from tests.processes import descendants_running, kill_first


def test_a_killed_writer_fails_the_dataset_with_one_line_to_rerun(demo_hub, local_ray, tmp_path):
    """...and the failed dataset's Ray Data execution ends with it: its encoder actors give their CPUs back (an
    execution left running held them, and the next run's pools waited for them for ever)."""
    specs = parse_model_ids([DEFAULT_MODELS[6]])  # a TKY model
    options = RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path), executor=ExecutorMode.RAY, batch_size=16)
    killed: list[int] = []
    stop = threading.Event()
    # Writers of earlier tests on this Ray, killed when their runs ended, may not have exited yet: not this run's.
    earlier = {process.pid for process in descendants_running(os.getpid(), "WriterActor")}

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not killed and not stop.is_set() and time.monotonic() < deadline:
            pid = kill_first([p for p in descendants_running(os.getpid(), "WriterActor") if p.pid not in earlier])
            if pid is not None:
                killed.append(pid)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    # The execution must end because the run ends it (it collects once when a dataset fails), not whenever the
    # collector next runs.
    gc.disable()
    try:
        (result,) = run_models(specs, options)
        deadline = time.monotonic() + 60
        while local_ray.available_resources().get("CPU", 0) < local_ray.cluster_resources()["CPU"]:
            assert time.monotonic() < deadline, f"CPUs still held after the run: {local_ray.available_resources()}"
            time.sleep(0.1)
    finally:
        gc.enable()
        stop.set()
        thread.join(timeout=10)
    assert killed, "no writer actor process was found to kill"
    assert not result.ok
    assert result.error == (
        "comp5331poi/tky: the writer process ended unexpectedly (it was killed or crashed); run the same command "
        "again: it resumes where this run stopped"
    )
