"""Starting or joining Ray: a run that cannot ends at once with one line naming the address (or the private Ray) and
what to do, instead of waiting on Ray's own retries (over 10 minutes for an address where nothing listens)."""

from __future__ import annotations

import json
import socket

import pytest
import ray

from rqvae_ray.errors import RayStartError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS
from rqvae_ray.ray_backend import cluster
from tests.conftest import run_cli


def _closed_port() -> int:
    """A loopback port where nothing listens (bound once to learn a free one, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_address_where_nothing_listens_fails_at_once_with_one_line(demo_hub, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    summary = tmp_path / "summary.json"
    args = [DEFAULT_MODELS[0], "--hub-dir", str(demo_hub), "--out-dir", str(tmp_path / "out"), "--address", address]
    # Ray itself would retry for over 10 minutes: the limit fails the test long before.
    proc = run_cli(*args, "--summary-json", str(summary), timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert f"could not join the Ray cluster at {address} (Connection refused); check --address" in errors[0]
    assert "0 of 1 models succeeded" in proc.stdout
    report = json.loads(summary.read_text())
    assert report["exit_reason"] == "Ray did not start"
    assert [(m["model"], m["status"]) for m in report["models"]] == [(DEFAULT_MODELS[0], "FAILED")]
    assert report["models"][0]["output"].startswith(f"could not join the Ray cluster at {address}")
    assert not list(tmp_path.rglob("codebooks-*"))


def test_a_private_ray_that_does_not_start_says_what_to_do(monkeypatch):
    def fail(**_kwargs):
        raise RuntimeError("The current node timed out during startup.\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(RayStartError) as raised:
        cluster.start_ray(None)
    assert str(raised.value) == (
        "the private Ray of this run did not start (RuntimeError: The current node timed out during startup.); on a "
        "busy machine run again, or run in this process with --executor local"
    )
    assert raised.value.address is None


@pytest.mark.parametrize(
    ("address", "probed"),
    [("127.0.0.1:6379", True), ("[::1]:6379", True), ("head-node:6379", True), ("auto", False), ("local", False)]
    + [("ray://127.0.0.1:10001", False), ("127.0.0.1", False)],
)
def test_only_gcs_addresses_are_probed_before_joining(address, probed):
    assert cluster._host_and_port(address) is probed
