"""Bad inputs, interruptions and faults: every failure is one clear line, and nothing partial is ever published."""

from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.inputs.demo import fit_checkpoint, nyc_features, tky_features, write_dataset
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id, parse_model_ids
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, FEATURES_FILE, METADATA_FILE, PID_MAPPING_FILE, LocalHub
from rqvae_ray.outputs.layout import codebooks_filename, output_dir
from rqvae_ray.outputs.resume import ResumeState
from rqvae_ray.pipeline.options import ExecutorMode, PoolSizing, RunOptions
from rqvae_ray.pipeline.progress import Progress, Quiet
from rqvae_ray.runner import run_models
from tests.conftest import REPO, run_cli
from tests.gate import TKY_INPUT_DIM, Gate, GateControl
from tests.processes import descendants_running, group_empty_within, group_members, kill_first
from tests.writing import csv_name

N = 300
MARKER_NAME = "pwned-by-pickle"


class Payload:
    """Pickles to a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _model(hub: Path, model_id: str, checkpoint: object) -> None:
    spec = parse_model_id(model_id)
    path = hub / "models" / spec.org / spec.name / "rqvae_best.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, bytes):
        path.write_bytes(checkpoint)
    else:
        torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def bad_hub(tmp_path_factory):
    """A small hub with one good model and one model or dataset for each bad input of the catalogue."""
    hub = tmp_path_factory.mktemp("badhub")
    features, metadata, mapping = nyc_features()
    features, mapping = features[:N], mapping[:N]
    metadata = {**metadata, "num_pois": N}
    good = fit_checkpoint(parse_model_id("good/rqvae-nyc-ok"), features)
    write_dataset(hub, "good/nyc", features, metadata, mapping)
    _model(hub, "good/rqvae-nyc-ok", good)
    buffer = io.BytesIO()
    torch.save(good, buffer)
    _model(hub, "good/rqvae-nyc-truncated", buffer.getvalue()[: len(buffer.getvalue()) // 2])
    marker = hub / MARKER_NAME
    _model(hub, "good/rqvae-nyc-pickle", {**good, "hook": Payload(marker)})
    _model(hub, "good/rqvae-nyc-global", {**good, "trained_on": datetime.date(2025, 1, 1)})
    state = dict(good["model_state_dict"])
    missing = {k: v for k, v in state.items() if k != "encoder.proj.weight"}
    _model(hub, "good/rqvae-nyc-missingkey", {"model_state_dict": missing})
    shapes = {**state, "quantizer.quantizers.1.vectors.weight": torch.zeros(32, 16)}
    _model(hub, "good/rqvae-nyc-badshape", {"model_state_dict": shapes})
    tky = tky_features()[0][:200]
    _model(hub, "good/rqvae-nyc-tkydims", fit_checkpoint(parse_model_id("x/rqvae-tky-a"), tky))

    def dataset(org: str, feats=features, meta=metadata, rows=mapping) -> None:
        write_dataset(hub, f"{org}/nyc", feats, meta, rows)
        _model(hub, f"{org}/rqvae-nyc-a", good)

    with_nan = features.copy()
    with_nan[41, 3] = np.nan
    dataset("nan", with_nan)
    dataset("inf", np.where(np.arange(N)[:, None] == 7, np.inf, features).astype(np.float32))
    dataset("dupmap", rows=mapping[:-1] + [("dup", mapping[0][1])])
    dataset("shortmap", rows=mapping[:-5])
    dataset("nomap")
    (hub / "datasets/nomap/nyc/Intermediate Files/pid_mapping.csv").unlink()
    dataset("empty", features[:0], {**metadata, "num_pois": 0}, [])
    dataset("nometa")
    (hub / "datasets/nometa/nyc/RQVAE Dataset/metadata.json").unlink()
    dataset("badmeta", meta={**metadata, "total_dim": 999})
    # Parquet shards: NaN in dense features is found by the encoder actors (inside Ray), a Pid gap on the driver.
    _parquet_dataset(hub, "nanpq", with_nan, metadata, mapping, np.arange(1, N + 1))
    _model(hub, "nanpq/rqvae-nyc-a", good)
    _parquet_dataset(hub, "gappq", features, metadata, mapping, np.r_[1:201, 202 : N + 2])
    _model(hub, "gappq/rqvae-nyc-a", good)
    return hub


def _parquet_dataset(hub: Path, org: str, features: np.ndarray, metadata: dict, mapping, pids: np.ndarray) -> None:
    """A dataset of two dense Parquet shards (rows 1-150 and 151-N) with the given Pid column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_dataset(hub, f"{org}/nyc", features, metadata, mapping)
    base = hub / "datasets" / org / "nyc" / "RQVAE Dataset"
    (base / "poi_features.pt").unlink()
    (base / "poi_features").mkdir()
    for part, rows in enumerate((slice(0, 150), slice(150, N))):
        flat = pa.array(features[rows].ravel())
        table = pa.table(
            {"Pid": pa.array(pids[rows]), "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1])}
        )
        pq.write_table(table, base / "poi_features" / f"part-{part}.parquet")


BAD_MODELS = {
    "good/rqvae-div0.25": "must say its dataset",
    "good/rqvae-nyc-div0.2.5": "'div0.2.5' is not a number",
    "../x/..": "exactly one '/'",
    "good/..": "is a path, not a name",
    "good/rqvae-nyc-missing": "not found",
    "good/rqvae-nyc-truncated": "corrupt or truncated",
    "good/rqvae-nyc-pickle": "refused to load",
    "good/rqvae-nyc-global": "refused to load",
    "good/rqvae-nyc-missingkey": "missing key 'encoder.proj.weight'",
    "good/rqvae-nyc-badshape": "inconsistent shapes",
    "good/rqvae-nyc-tkydims": "takes 2569 input features but good/nyc has 1407",
    "nan/rqvae-nyc-a": "NaN or Inf (first at Pid 42)",
    "inf/rqvae-nyc-a": "NaN or Inf (first at Pid 8)",
    "dupmap/rqvae-nyc-a": "repeats Mapped_Pid 1",
    "shortmap/rqvae-nyc-a": "has 295 rows but the features have 300",
    "nomap/rqvae-nyc-a": "pid_mapping.csv' is missing",
    "empty/rqvae-nyc-a": "empty (0 POIs)",
    "nometa/rqvae-nyc-a": "metadata.json' is missing",
    "badmeta/rqvae-nyc-a": "total_dim 999 but the features have 1407",
    "nanpq/rqvae-nyc-a": "nanpq/nyc: features contain NaN or Inf (first at Pid 42)",
    "gappq/rqvae-nyc-a": "row 51 (1-based) has Pid 202 where Pid 201 was expected",
    "o" * 265 + "/rqvae-nyc-a": "at most 96",
}


@pytest.mark.parametrize("executor", ["local", pytest.param("ray", marks=pytest.mark.starts_ray)])
def test_bad_input_catalogue(bad_hub, tmp_path, executor, request):
    """Every bad input fails its own model with one line, on both executors (on Ray, the failures found inside Ray
    Data's tasks surface as the same lines)."""
    if executor == "ray":
        request.getfixturevalue("own_ray")
    out, summary, log = tmp_path / "out", tmp_path / "summary.json", tmp_path / "run.log"
    args = ["--hub-dir", str(bad_hub), "--out-dir", str(out), "--summary-json", str(summary), "--log-file", str(log)]
    proc = run_cli("good/rqvae-nyc-ok", *BAD_MODELS, *args, "--executor", executor)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    # The console holds the project's own lines only: Ray's (and any traceback or retry advice) are in the log.
    for noise in ("Traceback", "retry", "streaming_executor", "core_worker", "INFO worker.py", "WARNING"):
        assert noise not in console, noise
    assert f"Log of this run (Ray's and the libraries' own output): {log}" in proc.stdout
    assert ("Started a local Ray instance" in log.read_text()) == (executor == "ray")
    document = json.loads(summary.read_text())
    assert document["exit_code"] == 1 and document["exit_reason"] == f"{len(BAD_MODELS)} model(s) failed"
    rows = {row["model"]: row for row in document["models"]}
    assert rows["good/rqvae-nyc-ok"]["status"] == "ok" and rows["good/rqvae-nyc-ok"]["quality"]["pois"] == N
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    for model_id, reason in BAD_MODELS.items():
        lines = [
            line
            for line in errors
            if line.startswith((f"error: {model_id}: ", f"error: invalid model ID {model_id!r}"))
        ]
        assert len(lines) == 1, (model_id, errors)
        assert reason in lines[0], (model_id, lines[0])
    assert f"1 of {1 + len(BAD_MODELS)} models succeeded" in proc.stdout
    assert not (bad_hub / MARKER_NAME).exists()
    published = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert published == ["codebooks-rqvae-nyc-ok.csv", "rqvae_ray-manifest.json", "sid_quality.json", "sid_quality.png"]
    good_csv = next(out.rglob("codebooks-rqvae-nyc-ok.csv"))
    assert len(good_csv.read_text().splitlines()) == N + 1
    assert not list(out.rglob("*.partial"))


def test_unwritable_output_fails_before_any_work(bad_hub, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_cli("good/rqvae-nyc-ok", "--hub-dir", str(bad_hub), "--out-dir", str(blocker / "out"), timeout=120)
    assert proc.returncode == 2
    assert "is not writable" in proc.stderr and str(blocker / "out") in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_up_to_date_outputs_are_skipped_and_force_redoes_them(bad_hub, tmp_path):
    out = tmp_path / "out"

    def in_process() -> list[str]:
        """The same run through the Python API (in this process): its notes."""
        notes: list[str] = []
        options = RunOptions(hub=LocalHub(bad_hub), out_dir=str(out))
        results = run_models(parse_model_ids(["good/rqvae-nyc-ok"]), options, Progress(notes.append))
        assert all(r.ok for r in results), [r.error for r in results]
        return notes

    first = run_cli("good/rqvae-nyc-ok", "--hub-dir", str(bad_hub), "--out-dir", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    path = next(out.rglob("codebooks-rqvae-nyc-ok.csv"))
    before, manifest = path.read_bytes(), json.loads(next(out.rglob("rqvae_ray-manifest.json")).read_text())
    entry = manifest["files"]["codebooks-rqvae-nyc-ok.csv"]
    assert entry["model_id"] == "good/rqvae-nyc-ok"
    assert entry["rows"] == N and len(entry["sha256"]) == 64 and len(entry["checkpoint_sha256"]) == 64
    assert entry["features_sha256"] and entry["tool_version"] and entry["sid_stats"]["pois"] == N
    assert any("up to date" in note and "skipped" in note for note in in_process())
    path.write_bytes(before[:-10])  # a damaged output is not up to date
    assert not any("up to date" in note for note in in_process())
    assert path.read_bytes() == before
    forced = run_cli("good/rqvae-nyc-ok", "--hub-dir", str(bad_hub), "--out-dir", str(out), "--force", "--quiet")
    assert forced.returncode == 0 and "up to date" not in forced.stdout
    # --quiet: the final table and the count, no notes and no progress.
    assert "POIs x 1407 features" not in forced.stdout and "POIs written" not in forced.stdout
    assert "good/rqvae-nyc-ok" in forced.stdout and "1 of 1 models succeeded" in forced.stdout
    assert path.read_bytes() == before


def _visible_files(out: Path) -> list[Path]:
    """Published files: partial files and resume state are hidden (their names start with a dot)."""
    return [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")]


def _assert_complete(out: Path) -> None:
    """Every visible codebooks file is complete and matches its manifest entry."""
    for path in _visible_files(out):
        if path.name.startswith("codebooks-"):
            manifest = json.loads((path.parent / "rqvae_ray-manifest.json").read_text())
            entry = manifest["files"][path.name]
            with path.open(newline="") as handle:
                rows = list(csv.reader(handle))
            assert len(rows) == entry["rows"] + 1


def _start_cli(args: list[str], gate: GateControl | None = None) -> subprocess.Popen:
    """The CLI in its own process group (so that the test can signal it and its Ray), output merged on stdout; with
    ``gate``, its TKY models' encoders wait at that gate (see :mod:`tests.gate`)."""
    module = ["rqvae_ray.run"] if gate is None else ["tests.gated_cli", str(gate.folder), str(TKY_INPUT_DIM)]
    return subprocess.Popen(
        [sys.executable, "-m", *module, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _read_output(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    """``proc``'s output lines as they come (read by a thread, so that the run never blocks on a full pipe)."""
    lines: list[str] = []
    thread = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    thread.start()
    return lines, thread


def _wait_for(state, proc: subprocess.Popen, lines: list[str], what: str, wait_s: float = 300) -> None:
    """Wait until ``state()`` holds while ``proc`` runs (its output goes to ``lines``); fail if it ends first."""
    if _until(state, proc, wait_s):
        return
    assert proc.poll() is None, f"the run ended before {what}: {''.join(lines)[-2000:]}"
    pytest.fail(f"no {what} within {wait_s:.0f} s: {''.join(lines)[-2000:]}")


def _until(state, proc: subprocess.Popen, wait_s: float = 300) -> bool:
    """Wait until ``state()`` holds or ``proc`` ends, at most ``wait_s``; whether ``state()`` holds."""
    deadline = time.monotonic() + wait_s
    while not state() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return state()


INTERRUPTED_MODELS = [DEFAULT_MODELS[0], *DEFAULT_MODELS[8:10]]  # one NYC model, two TKY models
TKY_POIS = 7900  # the demo TKY dataset's


def _published(path: Path) -> bool:
    """Whether ``path`` is in place and entered in its folder's manifest (written after the files are renamed)."""
    manifest = path.parent / "rqvae_ray-manifest.json"
    try:
        return path.is_file() and path.name in json.loads(manifest.read_text())["files"]
    except (OSError, ValueError):
        return False


@pytest.mark.parametrize(
    ("sig", "executor"),
    [
        (signal.SIGKILL, "local"),
        (signal.SIGINT, "local"),
        pytest.param(signal.SIGINT, "ray", marks=pytest.mark.starts_ray),
    ],
)
def test_interrupted_run_publishes_nothing_partial_and_next_run_completes(
    demo_hub, demo_run, tmp_path, sig, executor, request
):
    if executor == "ray":
        request.getfixturevalue("own_ray")
    out = tmp_path / "out"
    nyc, tky = (output_dir(out, f"comp5331poi/{name}", "LLM Dataset") for name in ("nyc", "tky"))
    nyc_file = nyc / csv_name(parse_model_id(INTERRUPTED_MODELS[0]))
    args = [*INTERRUPTED_MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--batch-size", "256"]
    gate = GateControl(tmp_path / "gate")  # TKY's encoders wait there: TKY cannot finish before the test lets it
    proc = _start_cli([*args, "--executor", executor], gate)
    # Killed in the end whatever happens: a run that outlived a failed check must not stay behind (with its Ray).
    try:
        lines, _ = _read_output(proc)
        # Interrupted once NYC is published and TKY is being written (its resume state exists), with at most half of
        # TKY let through the gate: states, not timing.
        _wait_for(lambda: _published(nyc_file), proc, lines, "NYC was published")
        gate.open_until(
            lambda: tky.is_dir() and bool(list(tky.glob(".codebooks-*.resume.json"))),
            lambda: proc.poll() is None,
            limit=TKY_POIS // 2,
            what="TKY's resume state",
            output=lambda: "".join(lines)[-2000:],
        )
        assert proc.poll() is None, f"the run ended before it was interrupted: {''.join(lines)[-2000:]}"
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
        output = "".join(lines)
        if sig == signal.SIGINT:
            assert proc.returncode == 130, output[-2000:]
            # Ray is shut down before the driver exits: none of the run's processes (its process group) lives on.
            assert group_empty_within(proc.pid, 20), [p.cmdline()[:2] for p in group_members(proc.pid)]
            assert not list(out.rglob("*.partial")), "an interrupted run left partial files behind"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert group_empty_within(proc.pid, 60)
    _assert_complete(out)
    assert not [p for p in _visible_files(out) if "tky" in p.parts], "a TKY output was published before it was complete"
    again = run_cli(*INTERRUPTED_MODELS, "--hub-dir", str(demo_hub), "--out-dir", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    reference, _ = demo_run
    for spec in parse_model_ids(INTERRUPTED_MODELS):
        rel = Path("datasets") / spec.org / spec.dataset / "LLM Dataset" / "Intermediate Files" / csv_name(spec)
        assert (out / rel).read_bytes() == (reference / rel).read_bytes()
    assert not [p.name for p in out.rglob(".*") if p.is_file()], "the completed run left partial files or resume state"


@pytest.mark.parametrize(
    ("sizing", "marker"),
    [
        (PoolSizing(min_actors=1), "EncodeModels"),  # an actor pool: Ray Data restarts the actor, retries its task
        (PoolSizing(), "encode_in_task"),  # a small auto-sized pool runs as tasks: Ray retries the task elsewhere
    ],
    ids=["actor", "task"],
)
def test_killed_encoder_is_replaced_and_output_identical(demo_hub, demo_run, local_ray, tmp_path, sizing, marker):

    specs = parse_model_ids([DEFAULT_MODELS[6]])
    gate = GateControl(tmp_path / "gate")  # the TKY encoders wait there: the run cannot end before the kill
    options = RunOptions(
        hub=LocalHub(demo_hub),
        out_dir=str(tmp_path),
        batch_size=256,
        pools=sizing,
        executor=ExecutorMode.RAY,
        encoder_factory=Gate(gate.folder),
    )
    killed: list[int] = []
    # Encoder actors of earlier tests on this Ray, whose pools ended with their runs, may not have exited yet.
    earlier = {process.pid for process in descendants_running(os.getpid(), marker)}

    def killer() -> None:
        """Once a quarter of TKY is encoded (the rest held at the gate), kill an encoder; then open the gate."""
        try:
            gate.allow(TKY_POIS // 4)
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                passed = gate.passed()
                # Only this test's own Ray (started by this process) is a target, never another Ray on the machine.
                actors = descendants_running(os.getpid(), marker) if passed and min(passed) >= gate.allowed else []
                pid = kill_first([actor for actor in actors if actor.pid not in earlier])
                if pid is not None:
                    killed.append(pid)
                    return
                time.sleep(0.05)
        finally:
            gate.allow(TKY_POIS * 2)  # the rest of the run, on the actor that replaces it

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = run_models(specs, options)
    thread.join(timeout=5)
    assert killed, "no encoder process was found to kill"
    assert results[0].ok, results[0].error
    reference, _ = demo_run
    rel = Path("datasets/comp5331poi/tky/LLM Dataset/Intermediate Files") / csv_name(specs[0])
    assert (tmp_path / rel).read_bytes() == (reference / rel).read_bytes()


def test_lost_ray_cluster_exits_with_one_clear_line_and_keeps_finished_files(demo_hub, demo_run, tmp_path, own_ray):
    models = [DEFAULT_MODELS[0], *DEFAULT_MODELS[5:9]]  # one NYC model, four TKY models
    spec = parse_model_id(models[0])
    # Ray 2.60's raylet waits at most 15 s (fixed) for its dashboard agent, a Python process, to start; beside the
    # other xdist worker's actor pools on 2 cores the agent has taken longer (2 runs of the suite in 6 one slow night),
    # and the run ended as one whose Ray did not start. A cluster that never came up is not what this test loses, so
    # such a run is started once more.
    for attempt in (1, 2):
        out = tmp_path / f"out-{attempt}"
        nyc_file = output_dir(out, spec.dataset_repo, "LLM Dataset") / csv_name(spec)
        summary = tmp_path / f"summary-{attempt}.json"
        args = [*models, "--hub-dir", str(demo_hub), "--out-dir", str(out), "--executor", "ray"]
        args += ["--summary-json", str(summary)]
        # Closed for good: TKY is unfinished when the cluster is lost.
        proc = _start_cli(args, GateControl(tmp_path / f"gate-{attempt}"))
        lines, reader = _read_output(proc)
        published = functools.partial(_published, nyc_file)
        try:
            ended = not _until(published, proc) and proc.poll() is not None
            never_started = summary.is_file() and json.loads(summary.read_text())["exit_reason"] == "Ray did not start"
            if ended and attempt == 1 and never_started:
                continue
            _wait_for(published, proc, lines, "NYC was published")
            gcs = descendants_running(proc.pid, "gcs_server")
            assert gcs, "the run's own GCS process was not found"
            for process in gcs:
                process.kill()
            started = time.monotonic()
            proc.wait(timeout=120)
            waited = time.monotonic() - started
            reader.join(timeout=60)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        break
    output = "".join(lines)
    assert proc.returncode == 1, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "lost the connection to the Ray cluster" in errors[0], output[-2000:]
    assert waited < 50, "Ray's own 60 s abort came first"
    _assert_complete(out)
    reference, _ = demo_run
    rel = Path("datasets") / spec.org / spec.dataset / "LLM Dataset" / "Intermediate Files" / csv_name(spec)
    assert (out / rel).read_bytes() == (reference / rel).read_bytes()
    assert not [p for p in _visible_files(out) if "tky" in p.parts]


class _Notes(Progress):
    """Keeps the notes a run reports."""

    def __init__(self) -> None:
        super().__init__(lambda _text: None)
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm")
def test_outputs_publish_into_a_folder_on_another_filesystem(demo_hub, demo_run, tmp_path):
    spec = parse_model_id(DEFAULT_MODELS[0])
    out = tmp_path / "out"
    folder = output_dir(out, spec.dataset_repo, "LLM Dataset")
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        assert os.stat(elsewhere).st_dev != os.stat(tmp_path).st_dev
        folder.parent.mkdir(parents=True)
        folder.symlink_to(elsewhere)  # 'Intermediate Files' on a tmpfs, as a bind mount or network share would be
        (result,) = run_models([spec], RunOptions(hub=LocalHub(demo_hub), out_dir=str(out)), Quiet())
        assert result.ok, result.error
        reference, _ = demo_run
        name = codebooks_filename(spec.name, OutputFormat.CSV)
        assert (elsewhere / name).read_bytes() == (
            output_dir(reference, spec.dataset_repo, "LLM Dataset") / name
        ).read_bytes()
        assert not list(elsewhere.glob("*.partial"))
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_each_format_has_its_own_manifest_entry_and_changed_options_replace_the_file(demo_hub, tmp_path):
    spec = parse_model_id(DEFAULT_MODELS[0])
    hub, out = LocalHub(demo_hub), str(tmp_path)
    folder = output_dir(tmp_path, spec.dataset_repo, "LLM Dataset")
    csv_name = codebooks_filename(spec.name, OutputFormat.CSV)
    parquet_name = codebooks_filename(spec.name, OutputFormat.PARQUET)

    def run(output: OutputSpec) -> list[str]:
        notes = _Notes()
        (result,) = run_models([spec], RunOptions(hub=hub, out_dir=out, output=output), notes)
        assert result.ok, result.error
        return notes.notes

    run(OutputSpec())
    run(OutputSpec(OutputFormat.PARQUET))
    again = run(OutputSpec())
    assert any("up to date" in note and csv_name in note for note in again)  # the Parquet run kept the CSV's entry
    entries = json.loads((folder / "rqvae_ray-manifest.json").read_text())["files"]
    assert set(entries) == {csv_name, parquet_name}
    parquet_before = entries[parquet_name]
    dedup = run(OutputSpec(dedup=True))
    assert any(f"replacing {csv_name}" in note and "--dedup on" in note for note in dedup), dedup
    entries = json.loads((folder / "rqvae_ray-manifest.json").read_text())["files"]
    assert entries[csv_name]["dedup"] is True and entries[parquet_name] == parquet_before
    assert any(len(json.loads(line.split('"')[1])) == 4 for line in (folder / csv_name).read_text().splitlines()[1:])


def _tiled_tky_hub(demo_hub: Path, root: Path, models: list[str], copies: int) -> Path:
    """The demo TKY dataset ``copies`` times over (Pid k + 7900 j has Pid k's features), as sparse Parquet shards of
    7,900 rows, with the demo checkpoints of ``models``."""
    for spec in parse_model_ids(models):
        target = root / "models" / spec.org / spec.name / CHECKPOINT_FILE
        target.parent.mkdir(parents=True)
        shutil.copy(demo_hub / "models" / spec.org / spec.name / CHECKPOINT_FILE, target)
    source, base = demo_hub / "datasets" / "comp5331poi" / "tky", root / "datasets" / "comp5331poi" / "tky"
    shutil.copytree(source, base, ignore=shutil.ignore_patterns(Path(FEATURES_FILE).name))
    rows = SparseRows.from_dense(torch.load(source / FEATURES_FILE, weights_only=True).numpy())
    n = rows.num_rows * copies
    metadata = json.loads((base / METADATA_FILE).read_text())
    (base / METADATA_FILE).write_text(json.dumps({**metadata, "num_pois": n}))
    with (base / PID_MAPPING_FILE).open("w", newline="") as handle:
        csv.writer(handle).writerows([("Original_Pid", "Mapped_Pid"), *((f"v{pid}", pid) for pid in range(1, n + 1))])
    shards = base / "RQVAE Dataset" / "poi_features"
    shards.mkdir()
    for copy in range(copies):
        table = sparse_table(rows, first_pid=copy * rows.num_rows + 1)
        pq.write_table(table, shards / f"part-{copy:05d}.parquet")
    return root


def test_a_killed_run_resumes_where_it_stopped_to_the_same_bytes(demo_hub, tmp_path):
    models = DEFAULT_MODELS[8:10]  # two TKY models
    hub = _tiled_tky_hub(demo_hub, tmp_path / "hub", models, copies=2)
    pois = 2 * TKY_POIS
    output = OutputSpec(OutputFormat.PARQUET, dedup=True, sid_tokens=True)
    reference = tmp_path / "reference"
    results = run_models(
        parse_model_ids(models), RunOptions(hub=LocalHub(hub), out_dir=str(reference), output=output), Quiet()
    )
    assert all(r.ok for r in results), [r.error for r in results]
    out = tmp_path / "out"
    args = [*models, "--hub-dir", str(hub), "--out-dir", str(out), "--format", "parquet", "--dedup", "--sid-tokens"]
    finals = [
        output_dir(out, spec.dataset_repo, "LLM Dataset") / codebooks_filename(spec.name, OutputFormat.PARQUET)
        for spec in parse_model_ids(models)
    ]
    gate = GateControl(tmp_path / "gate")  # the encoders wait there: the run cannot finish before the test lets it
    proc = _start_cli([*args, "--batch-size", "16"], gate)
    lines, _ = _read_output(proc)

    def kept() -> int:
        """The rows that both files' resume states keep (0 until both have one)."""
        states = [ResumeState.read(final) for final in finals]
        return min(s.rows for s in states) if all(states) else 0

    try:
        # Caught in the middle: with resume state of both files, and at most half the POIs let through the gate.
        gate.open_until(
            lambda: kept() > 0,
            lambda: proc.poll() is None,
            limit=pois // 2,
            what="resume state of both files",
            output=lambda: "".join(lines)[-2000:],
        )
        caught = kept()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray, at once: no clean-up of any kind
        proc.wait(timeout=60)
    assert 0 < caught < pois, f"the run was not caught in the middle: {''.join(lines)[-2000:]}"
    # The next run resumes only from state whose writer has ended: wait for the killed run's processes to be gone.
    assert group_empty_within(proc.pid, 60), [p.cmdline()[:2] for p in group_members(proc.pid)]
    again = run_cli(*args)  # another batch size: the blocks differ, the bytes must not
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = re.search(r"resuming an interrupted run: (\d+) POIs kept", again.stdout)
    assert resumed and caught <= int(resumed.group(1)) < pois, again.stdout[-2000:]
    for spec in parse_model_ids(models):
        name = codebooks_filename(spec.name, OutputFormat.PARQUET)
        got, want = (
            output_dir(out, spec.dataset_repo, "LLM Dataset"),
            output_dir(reference, spec.dataset_repo, "LLM Dataset"),
        )
        assert (got / name).read_bytes() == (want / name).read_bytes()
        assert sorted(p.name for p in got.iterdir() if p.name.startswith(".")) == []  # no resume state, no partial
