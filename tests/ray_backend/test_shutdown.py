"""Stopping a private local Ray: its processes that outlive ``ray.shutdown()`` are killed after a short grace."""

from __future__ import annotations

import signal
import subprocess
import sys

import ray

from rqvae_ray.ray_backend import cluster, compat

# A process that ignores SIGTERM and would run for a minute: what a Ray worker slow to notice its raylet is gone looks
# like from outside.
STUBBORN = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"


def test_processes_left_after_shutdown_are_killed_and_their_children_too(monkeypatch):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {STUBBORN!r}]).wait()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "up"  # the grandchild (a "worker") is running
        monkeypatch.setattr(compat, "local_node_pids", lambda: {parent.pid})
        monkeypatch.setattr(ray, "shutdown", lambda: None)  # as if Ray's own shutdown left them behind
        tree = cluster._local_ray_processes()
        assert parent.pid in tree and len(tree) == 2
        cluster._shutdown_ray()
        assert cluster._alive(tree) == []
        assert parent.wait(timeout=10) == -signal.SIGKILL
    finally:
        parent.kill()
