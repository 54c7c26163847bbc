"""Stop signals: SIGTERM (what ``ray job stop`` sends) and SIGHUP stop a run as Ctrl-C does: one line, no partial
file, the resume state kept, the summary JSON written, status 128 + the signal's number, and no process left."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rqvae_ray.cli.app import _install_stop_handlers, _raise_stop, _stop_signal, _stop_signal_in
from rqvae_ray.errors import StopSignal
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.outputs.layout import output_dir
from tests.conftest import REPO
from tests.gate import TKY_INPUT_DIM, GateControl
from tests.processes import group_empty_within, group_members
from tests.writing import csv_name

WAIT_S = 300.0
MODELS = [DEFAULT_MODELS[0], *DEFAULT_MODELS[8:10]]  # one NYC model, two TKY models


class _Run:
    """The CLI in a session of its own (the test signals it; its Ray processes share its process group), its output
    in files so that it never blocks on a full pipe; its TKY models' encoders wait at a gate (see :mod:`tests.gate`),
    so that it cannot finish before the test lets it."""

    def __init__(self, args: list[str], folder: Path, env: dict[str, str] | None = None) -> None:
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        self.gate = GateControl(folder / "gate")
        with self.stdout.open("w") as out, self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.gated_cli", str(self.gate.folder), str(TKY_INPUT_DIM), *args],
                cwd=REPO,
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def wait_until(self, state: Callable[[], bool], what: str) -> None:
        """Wait until ``state()`` holds while the run goes on; fail if the run ends first or it takes too long."""
        deadline = time.monotonic() + WAIT_S
        while not state():
            assert time.monotonic() < deadline, f"no {what} within {WAIT_S:.0f} s: {self.output()}"
            try:
                self.proc.wait(timeout=0.05)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the run ended (status {self.proc.returncode}) before {what}: {self.output()}")

    def stop(self, signum: int) -> int:
        """Send ``signum`` to the run, which must still be going, and wait for it to end; its status."""
        assert self.proc.poll() is None, f"the run ended before it was signalled: {self.output()}"
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=120)

    def output(self) -> str:
        return self.stdout.read_text()[-2000:] + self.stderr.read_text()[-2000:]

    def kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hidden_files(out: Path) -> list[Path]:
    """Resume states and partial files (their names start with a dot)."""
    return [p for p in out.rglob(".*") if p.is_file()] if out.exists() else []


def _stopped(run: _Run, summary: Path, out: Path, code: int, name: str) -> None:
    """What every stopped run shows: its status, one line, the summary's exit reason, and no partial file."""
    assert code == 128 + signal.Signals[name].value, run.output()
    lines = [line for line in run.stderr.read_text().splitlines() if line.strip()]
    assert lines == [f"error: stopped by {name}; finished outputs are kept, unfinished ones were not published"]
    document = json.loads(summary.read_text())
    assert (document["exit_code"], document["exit_reason"]) == (code, f"stopped by {name}")
    assert not list(out.rglob("*.partial")), "a stopped run left partial files behind"


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_a_run_as_ctrl_c_does(demo_hub, tmp_path, name):
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    args = [*MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "local", "--batch-size", "256"]
    run = _Run([*args, "--summary-json", str(summary)], tmp_path)
    try:
        # TKY, held at the gate, is being written when the run is stopped: its resume state is then kept.
        run.wait_until(lambda: bool(_hidden_files(out / "datasets" / "comp5331poi" / "tky")), "TKY's partial files")
        code = run.stop(signal.Signals[name])
    finally:
        run.kill_group()
    _stopped(run, summary, out, code, name)
    assert list(out.rglob(".*.resume.json")), "the resume state of the stopped run was not kept"


def test_a_run_started_under_nohup_outlives_a_hang_up(demo_hub, demo_run, tmp_path):
    """``nohup`` starts a run with SIGHUP ignored: the terminal's hang-up must not stop it (it did: the command put its
    own handler in place of the ignore). A hang-up while TKY is held at the gate, then the gate opened: the run ends
    as if nothing had happened, every file as the demo run wrote it."""
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    args = [*MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "local", "--batch-size", "256"]
    run = _Run([*args, "--summary-json", str(summary)], tmp_path, env={"GATED_CLI_IGNORED_SIGNALS": "SIGHUP"})
    try:
        run.wait_until(lambda: bool(_hidden_files(out / "datasets" / "comp5331poi" / "tky")), "TKY's partial files")
        assert run.proc.poll() is None, run.output()
        run.proc.send_signal(signal.SIGHUP)
        run.gate.allow(10**9)
        code = run.proc.wait(timeout=WAIT_S)
    finally:
        run.kill_group()
    assert code == 0, run.output()
    assert json.loads(summary.read_text())["exit_code"] == 0
    ref, _ = demo_run
    for spec in parse_model_ids(MODELS):
        written, want = (output_dir(root, spec.dataset_repo, "LLM Dataset") / csv_name(spec) for root in (out, ref))
        assert written.read_bytes() == want.read_bytes()
    assert not _hidden_files(out)


@pytest.fixture
def stop_signals_restored():
    """The stop signals' handlers of this process, put back after the test."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_stop_signal_ignored_at_start_stays_ignored(stop_signals_restored):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _install_stop_handlers()
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert signal.getsignal(signal.SIGTERM) is _raise_stop


def test_sigterm_stops_a_ray_run_and_leaves_no_ray_process(demo_hub, tmp_path, own_ray):
    """What ``ray job stop`` does: Ray's core worker installs a SIGTERM handler that aborts the process, which the run
    replaces with its own again once Ray is up. The run here gives up on its datasets at once, as on datasets that do
    not stop in time: their threads are still inside Ray's calls (a dataset starting its actors, TKY's at its next
    block) while it drops their files and ends. Leaving Ray under them made Ray's core worker end the process itself
    after the stop line (status 1, SIGABRT or SIGSEGV: 9 of 20 runs), and let the main thread and a dataset's own
    thread abort the dataset at the same time."""
    out, summary = tmp_path / "out", tmp_path / "summary.json"
    args = [*MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "ray", "--batch-size", "256"]
    # TKY held at the gate: the run goes on
    run = _Run([*args, "--summary-json", str(summary)], tmp_path, env={"GATED_CLI_CANCEL_WAIT_S": "0"})
    try:
        run.wait_until(lambda: bool(_hidden_files(out)), "resume state or partial file")
        code = run.stop(signal.SIGTERM)
        gone = group_empty_within(run.proc.pid, 20)
    finally:
        run.kill_group()
    _stopped(run, summary, out, code, "SIGTERM")
    assert gone, [p.cmdline()[:2] for p in group_members(run.proc.pid)]


def test_a_crash_writes_every_threads_stack_to_the_runs_log(demo_hub, tmp_path):
    """A segmentation fault (here sent while TKY is held at the gate) leaves the Python stacks of the run's threads in
    its log, and the status says the process died of the signal. Sent once NYC is published and both TKY models have
    their encoders (their batches then wait at the gate): Python's dump reads each thread's frames as they are, and
    sent while NYC was still encoding and a TKY encoder being built, the dump once ended in the middle of a working
    thread's frames (a fresh-clone CI run), before the main thread's stack, which comes last."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    args = [*MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "local", "--batch-size", "256"]
    nyc = output_dir(out, "comp5331poi/nyc", "LLM Dataset") / csv_name(parse_model_ids(MODELS[:1])[0])
    run = _Run([*args, "--log-file", str(log)], tmp_path)
    try:
        run.wait_until(
            lambda: nyc.is_file() and len(run.gate.passed()) == len(MODELS) - 1, "NYC published and TKY at the gate"
        )
        code = run.stop(signal.SIGSEGV)
    finally:
        run.kill_group()
    assert code == -signal.SIGSEGV, run.output()
    text = log.read_text()
    assert "Fatal Python error: Segmentation fault" in text, text[-3000:]
    # Every thread: the main one (in the command) and the dataset pool's, each under its own "Thread 0x..." header.
    assert text.count("Thread 0x") >= 2 and "rqvae_ray/cli/app.py" in text, text[-3000:]
    assert "concurrent/futures/thread.py" in text, text[-3000:]


def test_a_closed_standard_error_leaves_the_crash_handler_out():
    """With standard error closed there is nowhere to write the stacks: the command still runs (here its help)."""
    command = f"{shlex.quote(sys.executable)} -m rqvae_ray.run --help 2>&-"
    proc = subprocess.run(["sh", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Usage: rqvae-ray" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    ("exc", "signum"),
    [
        (StopSignal(signal.SIGTERM), signal.SIGTERM),
        (StopSignal(signal.SIGHUP), signal.SIGHUP),
        (KeyboardInterrupt(), signal.SIGINT),
        (SystemExit(signal.SIGTERM), signal.SIGTERM),  # Ray's own SIGTERM handler, when Ray leaves it in place
        (SystemExit(2), None),
        (SystemExit(None), None),
    ],
)
def test_the_signal_that_stopped_a_run(exc, signum):
    assert _stop_signal(exc) == signum


def _raised_while(handling: BaseException, error: Exception) -> Exception:
    """``error`` as raised while ``handling`` was being handled (its ``__context__``)."""
    try:
        raise handling
    except BaseException:
        try:
            raise error
        except Exception as raised:
            return raised


@pytest.mark.parametrize(
    ("exc", "signum"),
    [
        (StopSignal(signal.SIGTERM), signal.SIGTERM),
        (KeyboardInterrupt(), signal.SIGINT),
        # A cleanup that fails while the run stops (aborting a dataset, stopping the progress view): still the stop.
        (_raised_while(StopSignal(signal.SIGHUP), ValueError("I/O operation on closed file")), signal.SIGHUP),
        (_raised_while(KeyboardInterrupt(), RuntimeError("cannot schedule new futures")), signal.SIGINT),
        (RuntimeError("a bug"), None),
        (_raised_while(SystemExit(2), RuntimeError("a bug")), None),
    ],
)
def test_the_signal_that_stopped_a_run_along_what_it_raised(exc, signum):
    assert _stop_signal_in(exc) == signum
