"""Whether a writer that owns staged files has ended: a killed process not yet reaped by its parent has."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rqvae_ray.outputs.staging import owner_gone, owner_tag

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


def _wait_for_state(pid: int, state: str, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while _state(pid) != state:
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.01)


def test_a_running_process_is_alive_and_a_killed_unreaped_one_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    tag = f"{socket.gethostname()}-{child.pid}"
    try:
        assert not owner_gone(tag)
        child.send_signal(signal.SIGKILL)
        _wait_for_state(child.pid, "Z")  # killed, and not reaped: this test has not waited for it yet
        assert owner_gone(tag)
    finally:
        child.kill()
        child.wait(timeout=10)
    assert owner_gone(tag)


def test_this_process_is_alive_and_another_host_is_never_gone():
    assert not owner_gone(owner_tag())
    assert not owner_gone(f"{socket.gethostname()}-elsewhere-1")
    assert not owner_gone("some-other-host-1")
