"""Shared fixtures: the demo hub, one CLI run of the 10 default models, and an in-process local Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Ray must bind to loopback only, in this process and in every Ray process it starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parents[1]
# How long a test waits for its turn to start a Ray of its own (see own_ray_lock); the longest holder takes ~2 min.
OWN_RAY_WAIT_S = 900


def run_cli(*args: str, env: dict | None = None, timeout: int = 600, cwd: Path | None = None):
    """Run ``python -m rqvae_ray.run ARGS`` in a subprocess and return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "rqvae_ray.run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


def use_hub(monkeypatch: pytest.MonkeyPatch, url: str, cache: Path, token: str) -> None:
    """Point this process's huggingface_hub at the server at ``url``, with a cache of its own and ``token``
    (``huggingface_hub`` reads HF_ENDPOINT and HF_HOME into its constants at import time)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder every pytest-xdist worker of this session sees (the session's own base folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def own_ray_lock(tmp_path_factory: pytest.TempPathFactory):
    """The lock held by a test (or fixture) that starts a Ray of its own: a private Ray in a CLI run, ``ray start``, a
    simulated cluster. Such tests run one at a time across the xdist workers: two Ray start-ups at once, beside the
    other worker's tests on a 2-core machine, made Ray's own wait for a new node to register (30 s, fixed in Ray)
    run out."""
    from filelock import FileLock

    return FileLock(shared_root(tmp_path_factory) / "own_ray.lock", timeout=OWN_RAY_WAIT_S)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "starts_ray: the test starts a Ray of its own where no fixture says so")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that start a Ray of their own first, and those on the session's local Ray first in the second
    worker's share. pytest-xdist's worksteal hands each worker a contiguous share of this list (the first worker the
    first ``len // workers`` items) and an idle worker takes from the end of another's: one worker runs the Ray
    tests, which take turns (see :func:`own_ray_lock`), one after another from the start rather than waiting on each
    other at the end, and the other starts the one local Ray that serves the local-Ray tests."""
    own, local, rest = [], [], []
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "own_ray" in names or item.get_closest_marker("starts_ray"):
            own.append(item)
        else:
            (local if "local_ray" in names else rest).append(item)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    first_share = len(items) // workers if workers > 1 else len(own)
    filler = max(0, first_share - len(own))
    items[:] = own + rest[:filler] + local + rest[filler:]


@pytest.fixture
def own_ray(tmp_path_factory):
    """Held for the test: see :func:`own_ray_lock`."""
    with own_ray_lock(tmp_path_factory):
        yield


@pytest.fixture(scope="session")
def demo_hub(tmp_path_factory) -> Path:
    """The demo hub (real NYC + TKY-shaped data, 10 published-layout checkpoints), built once per session: the
    first worker to need it builds it, the others wait for it (it appears atomically) and only read it."""
    from filelock import FileLock

    from rqvae_ray.inputs.demo import build_demo_hub

    root = shared_root(tmp_path_factory)
    hub = root / "demo_hub"
    with FileLock(root / "demo_hub.lock"):
        if not hub.is_dir():
            build_demo_hub(hub, progress=lambda _: None)
    return hub


@pytest.fixture(scope="session")
def demo_run(demo_hub, tmp_path_factory):
    """One CLI run of the 10 default models on the demo hub: (out_dir, completed process), made once per session as
    the demo hub is: the first worker to need it runs it, the others wait for it and only read its outputs."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    folder = root / "demo_run"
    record = folder / "process.json"  # written last: the run is complete once it exists
    with FileLock(root / "demo_run.lock"):
        if not record.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            proc = run_cli("--hub-dir", str(demo_hub), "--out-dir", str(folder / "out"))
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            fields = {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
            (folder / "process.json.tmp").write_text(json.dumps(fields))
            (folder / "process.json.tmp").replace(record)
    return folder / "out", subprocess.CompletedProcess(**json.loads(record.read_text()))


# The own-Ray lock of the session's local Ray, once it has first started (see local_ray).
_local_ray_lock: list = []


def _init_local_ray(lock):
    """The ``ray`` module, the local Ray started if it is not running (under ``lock``, see :func:`own_ray_lock`)."""
    import ray

    if not ray.is_initialized():
        with lock:
            # As the product's private Ray (see start_ray): no idle workers started for the driver.
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
                _system_config={"prestart_worker_first_driver": False},
            )
    return ray


@pytest.fixture(scope="session")
def local_ray(tmp_path_factory):
    """An in-process local Ray for pipeline tests (2 CPUs, no dashboard), shared by the tests that follow one another
    on a worker: it starts for the first of them when no other test is starting a Ray of its own, and stops after the
    last (see :func:`pytest_runtest_teardown`) rather than idling beside the rest of the suite (an idle Ray keeps ~4 %
    of a core busy); a later test that uses it starts it again (see :func:`pytest_runtest_setup`)."""
    _local_ray_lock.append(own_ray_lock(tmp_path_factory))
    return _init_local_ray(_local_ray_lock[0])


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start the local Ray again for a test that uses it (its fixtures included) after it was stopped."""
    if _local_ray_lock and "local_ray" in getattr(item, "fixturenames", ()):
        _init_local_ray(_local_ray_lock[0])


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Stop a Ray left running in this process (the local Ray, or one an API run started) unless this worker's next
    test uses the local Ray (its fixtures included): the local-Ray tests come together (see
    :func:`pytest_collection_modifyitems`)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    if nextitem is not None and "local_ray" in getattr(nextitem, "fixturenames", ()):
        return
    ray.shutdown()
