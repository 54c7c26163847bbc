"""How a command-line process ends: once the files are published it begins stopping Ray, with the collector off and
what the run left frozen, and draws the quality report meanwhile; a command invoked in a process of its own (as
tests and notebooks do) leaves that process as it was."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys

from typer.testing import CliRunner

from rqvae_ray.cli.app import app
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS
from tests.conftest import REPO

# The real main(), with the shutdown and the report recorded in a file (the run's console takes the process's own
# output) as they happen; the shutdown itself is left out: this run is in this process, so there is no Ray to stop.
SCRIPT = r"""
import gc, os, sys, threading
import rqvae_ray.cli.app as app

EVENTS = open(os.environ["EVENTS_FILE"], "a", buffering=1)

def begin_shutdown():
    EVENTS.write(f"shutdown gc_enabled={gc.isenabled()} frozen={gc.get_freeze_count() > 0}\n")
    done = threading.Event()
    done.set()
    return done

real_report = app._report

def report(*args, **kwargs):
    EVENTS.write("report begins\n")
    real_report(*args, **kwargs)
    EVENTS.write("report ends\n")

app.begin_shutdown = begin_shutdown
app._report = report
sys.argv = ["rqvae-ray", *sys.argv[1:]]
app.main()
"""


def test_a_cli_process_begins_stopping_ray_frozen_before_it_draws_the_report(demo_hub, tmp_path):
    out, events = tmp_path / "out", tmp_path / "events.txt"
    args = [DEFAULT_MODELS[0], "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "local", "--quiet"]
    env = {**os.environ, "EVENTS_FILE": str(events)}
    command = [sys.executable, "-c", SCRIPT, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    expected = ["shutdown gc_enabled=False frozen=True", "report begins", "report ends"]
    assert events.read_text().splitlines() == expected
    assert (out / "sid_quality.png").is_file() and (out / "sid_quality.json").is_file()


def test_a_command_invoked_in_this_process_leaves_its_collector_signals_and_ray_alone(demo_hub, tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr("rqvae_ray.cli.app.begin_shutdown", lambda: stopped.append(True))
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    args = [DEFAULT_MODELS[0], "--hub-dir", str(demo_hub), "--out-dir", str(tmp_path / "out"), "--executor", "local"]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "sid_quality.png").is_file()
    assert not stopped
    assert gc.isenabled() and gc.get_freeze_count() == 0
    assert {signum: signal.getsignal(signum) for signum in handlers} == handlers


# The command line whose run meets a bug: not one of our errors, raised from inside the run.
BROKEN = r"""
import sys
import rqvae_ray.cli.app as app

def a_bug(*args, **kwargs):
    raise RuntimeError("the pipeline broke")

app.run_models = a_bug
sys.argv = ["rqvae-ray", *sys.argv[1:]]
app.main()
"""


def test_an_internal_error_says_one_line_and_leaves_its_traceback_in_the_runs_log(tmp_path):
    log = tmp_path / "run.log"
    args = [DEFAULT_MODELS[0], "--out-dir", str(tmp_path / "out"), "--executor", "local", "--log-file", str(log)]
    proc = subprocess.run(
        [sys.executable, "-c", BROKEN, *args, "--quiet"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = f"error: RuntimeError: the pipeline broke (--debug for details; the run's log is {log})"
    assert proc.stderr.splitlines() == [line]
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in a_bug" in text and "the pipeline broke" in text
