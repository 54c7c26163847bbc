"""Cluster mode: a real ``ray start`` head driven by ``ray job submit``, a simulated multi-node cluster with fake
GPUs, and an actor pool that can never start.

Every Ray started here is isolated from the other tests' local Ray (which uses ``/tmp/ray``): it gets its own short
temp dir, also exported as ``RAY_TMPDIR``, so its ``ray_current_cluster`` file lands there and not in
``/tmp/ray``. It is torn down by killing exactly its own processes (command line or environment naming that temp dir,
or the process group of ``ray start``), never with ``ray stop``, which stops every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.outputs.layout import codebooks_filename
from rqvae_ray.outputs.readers import iter_codebooks
from tests.conftest import REPO, own_ray_lock, run_cli
from tests.hub_server import HubServer
from tests.writing import csv_name

NYC_A, NYC_B = DEFAULT_MODELS[0], DEFAULT_MODELS[3]  # rqvae-nyc-div0.0, rqvae-nyc-div0.5
TKY = DEFAULT_MODELS[8]  # rqvae-tky-div0.5
VENV_BIN = Path(sys.executable).parent
HUB_TOKEN = "hf_cluster0123456789abcdefTESTtoken"
DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def output_csv(out: Path, model_id: str) -> Path:
    spec = parse_model_ids([model_id])[0]
    return out / "datasets" / spec.org / spec.dataset / "LLM Dataset" / "Intermediate Files" / csv_name(spec)


def written_csvs(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.csv"))


def assert_same_bytes_as_demo_run(out: Path, demo_out: Path, model_ids: list[str]) -> None:
    assert written_csvs(out) == sorted(output_csv(out, m).name for m in model_ids)
    for model_id in model_ids:
        got, want = output_csv(out, model_id), output_csv(demo_out, model_id)
        assert got.read_bytes() == want.read_bytes(), f"{model_id}: {got} differs from the single-node run {want}"


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def forget_address(address: str | None) -> bool:
    """Remove /tmp/ray/ray_current_cluster if it names ``address`` (a dead cluster that a bare ray.init() would
    try to join); True if it did."""
    if address and (read_text(DEFAULT_ADDRESS_FILE) or "").strip() == address:
        DEFAULT_ADDRESS_FILE.unlink(missing_ok=True)
        return True
    return False


def ray_processes(temp_dir: str, pgid: int | None = None) -> list[int]:
    """PIDs of the processes of the Ray that runs under ``temp_dir`` (and of the process group ``pgid``).

    Every Ray process has the temp dir in its command line or ``RAY_TMPDIR=<temp dir>`` in its environment (job
    drivers run in a session of their own, so the process group alone is not enough).
    """
    marker, env_marker = temp_dir.encode(), f"RAY_TMPDIR={temp_dir}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            in_group = pgid is not None and os.getpgid(pid) == pgid
        except (OSError, ProcessLookupError):
            continue
        if marker in cmdline or env_marker in environ or in_group:
            found.append(pid)
    return found


def kill_ray(temp_dir: str, pgid: int | None = None, deadline_s: float = 20.0) -> list[int]:
    """SIGKILL this Ray's processes (repeatedly: a dying raylet may still start workers); returns any survivors."""
    deadline = time.monotonic() + deadline_s
    while True:
        pids = [p for p in ray_processes(temp_dir, pgid) if not _is_zombie(p)]
        if not pids or time.monotonic() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def short_temp_dir() -> str:
    """A Ray temp dir short enough for unix socket paths (about 107 characters)."""
    return tempfile.mkdtemp(prefix="rc", dir="/tmp")


# ---------------------------------------------------------------------------------------------------------------------
# 1. A real head (`ray start --head`, dashboard and Jobs API) and `ray job submit --working-dir`.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def ray_head(tmp_path, own_ray):
    """A local ``ray start --head`` with the dashboard, token auth with a private token, the venv on PATH.

    Yields (dashboard URL, environment for Ray CLI clients, temp dir). Stopped by killing only its own processes.
    """
    temp_dir = short_temp_dir()
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_TMPDIR": temp_dir,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        # As if the venv were activated: a job's entrypoint finds `python` on the PATH of the head, not the
        # interpreter that runs `ray start`.
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "VIRTUAL_ENV": sys.prefix,
    }
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "PYTHONPATH"):
        env.pop(name, None)
    dashboard_port = free_port()
    command = [
        str(VENV_BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--port=0",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = tmp_path / "ray-start.log"
    head, address = None, None
    try:
        with log.open("w") as handle:
            # A new session: every daemon of this head shares the process group of `ray start`.
            head = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            head.wait(timeout=120)
        assert head.returncode == 0, log.read_text()[-3000:]
        address = (read_text(Path(temp_dir) / "ray_current_cluster") or "").strip()
        assert address, "ray start --temp-dir wrote no ray_current_cluster into its temp dir"
        yield f"http://127.0.0.1:{dashboard_port}", env, temp_dir
    finally:
        survivors = kill_ray(temp_dir, head.pid if head is not None else None)
        shutil.rmtree(temp_dir, ignore_errors=True)
        # `ray start --temp-dir` writes its address into that temp dir, not /tmp/ray: a later bare ray.init() must
        # never find this dead head.
        leaked = forget_address(address)
    assert not survivors, f"processes of the test head survived SIGKILL: {survivors}"
    assert not leaked, f"the test head wrote its address to {DEFAULT_ADDRESS_FILE}"


def ray_cli(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


@pytest.mark.timeout(600, method="signal")
def test_ray_job_submit_to_a_started_head(ray_head, demo_run, demo_hub, tmp_path):
    url, env, _ = ray_head
    demo_out, _ = demo_run
    out = tmp_path / "out"
    models = [NYC_A, NYC_B, TKY]
    submission_id = f"rqvae-ray-test-{secrets.token_hex(4)}"
    # The job needs the package only. The upload honours .gitignore, but untracked scratch files in a checkout
    # (benchmarks, outputs) would go too, and the Jobs API refuses bodies over 100 MiB.
    runtime_env = {"excludes": [f"/{name}" for name in sorted(os.listdir(REPO)) if name != "rqvae_ray"]}
    probe = (
        "import sys, rqvae_ray; print('driver-python', sys.prefix); "
        "print('driver-package', rqvae_ray.__file__, flush=True)"
    )
    run = shlex.join(["python", "-m", "rqvae_ray.run", *models, "--hub-dir", str(demo_hub), "--out-dir", str(out)])
    entrypoint = f"python -c {shlex.quote(probe)} && exec {run}"
    started = time.monotonic()
    submit = ray_cli(
        "job",
        "submit",
        "--address",
        url,
        "--submission-id",
        submission_id,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "sh",
        "-c",
        entrypoint,
        env=env,
        timeout=300,
    )
    seconds = time.monotonic() - started
    logs = submit.stdout + submit.stderr
    status = ray_cli("job", "status", "--address", url, submission_id, env=env, timeout=60)
    # `ray job status` prints SUCCEEDED as "Job '<id>' succeeded" (FAILED as "... failed", with the reason).
    assert f"Job '{submission_id}' succeeded" in status.stdout + status.stderr, logs[-5000:] + status.stdout
    assert submit.returncode == 0, logs[-5000:]
    assert "3 of 3 models succeeded" in logs
    # The driver ran with the head's (venv) python, on the code shipped with --working-dir, not on this checkout.
    assert f"driver-python {sys.prefix}\n" in logs, logs[-5000:]
    package = next(line.split(" ", 1)[1] for line in logs.splitlines() if line.startswith("driver-package "))
    assert "working_dir_files" in package and not Path(package).is_relative_to(REPO), package
    assert_same_bytes_as_demo_run(out, demo_out, models)
    print(f"job {submission_id}: {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------------------
# 2. A simulated four-node cluster (ray.cluster_utils.Cluster): a head, two fake-GPU workers and a CPU worker, in a
#    subprocess; a run into --out-dir, then an upload-only run whose writers spread over the nodes.
# ---------------------------------------------------------------------------------------------------------------------

CLUSTER_SCRIPT = r"""
import json, shutil, socket, sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.inputs.model_ids import parse_model_ids
from rqvae_ray.pipeline.options import RunOptions
from rqvae_ray.runner import run_models
from rqvae_ray.pipeline.options import PoolMode, PoolSizing
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.ray_backend import plan


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


hub, hub_copy, sharded, out, sharded_out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:6]
model_ids = sys.argv[6:]
node = {"node_ip_address": "127.0.0.1", "object_store_memory": 150 * 1024**2}
cluster = Cluster(
    initialize_head=True,
    head_node_args={
        "num_cpus": 0,  # as Ray advises for a large cluster's head: nothing asking for a CPU runs beside the driver
        "num_gpus": 0,
        "include_dashboard": True,  # the state API (list_actors) is served by the dashboard
        "dashboard_host": "127.0.0.1",
        "dashboard_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        **node,
    },
)
# Fake GPUs: Ray schedules on the declared count; there is no CUDA behind them.
workers = [cluster.add_node(num_cpus=1, num_gpus=1, dashboard_agent_listen_port=free_port(), **node) for _ in range(2)]
cpu_worker = cluster.add_node(num_cpus=2, num_gpus=0, dashboard_agent_listen_port=free_port(), **node)
try:
    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, log_to_driver=False)
    events, loaded = [], set()

    class Recorder(Progress):
        def note(self, message):
            events.append(message)
            print("progress:", message, flush=True)
            model_id = message.split(": ", 1)[0]
            if model_id in model_ids and "checkpoint" in message:
                loaded.add(model_id)
                if loaded == set(model_ids) and "HUB REMOVED" not in events:
                    # The driver has read everything it needs; from now on no process can read the hub.
                    shutil.rmtree(hub)
                    events.append("HUB REMOVED")

        def dataset_finished(self, repo, pois, models):
            self.note(f"{repo}: {pois} POIs written for {models} models")

    # Both models packed into each of two actors of one GPU each.
    sizing = PoolSizing(PoolMode.DATASET, min_actors=2, max_actors=2, gpus_per_actor=1.0)
    options = RunOptions(hub=LocalHub(hub), out_dir=out, pools=sizing, batch_size=1024)
    results = run_models(parse_model_ids(model_ids), options, Recorder())
    from ray.util.state import list_actors

    def actors():
        # An explicit address: without one the state API picks "the latest" of all Rays running on this machine.
        return list_actors(address=cluster.address, detail=True, limit=10000, raise_on_missing_output=False)

    first_run = actors()
    # Upload only: the files may be written anywhere, each writer pre-uploads its own (a writer per model here,
    # whatever the size; the plan is made in this process).
    plan.SID_ROWS_PER_WRITER = 1
    upload = RunOptions(hub=LocalHub(hub_copy), upload=True, pools=sizing, batch_size=1024, upload_retries=0)
    uploaded = run_models(parse_model_ids(model_ids), upload, Recorder())
    known = {a.actor_id for a in first_run}
    upload_writers = [a.node_id for a in actors() if a.class_name == "WriterActor" and a.actor_id not in known]
    # Parquet shards are read on the driver's node, which has no CPU here.
    as_parquet = OutputSpec(fmt=OutputFormat.PARQUET)
    from_shards = RunOptions(
        hub=LocalHub(sharded), out_dir=sharded_out, pools=sizing, batch_size=1024, output=as_parquet
    )
    sharded_results = run_models(parse_model_ids(model_ids[:1]), from_shards, Recorder())
    report = {
        "results": [{"model_id": r.model_id, "ok": r.ok, "error": r.error} for r in results],
        "uploaded": [{"model_id": r.model_id, "ok": r.ok, "error": r.error, "commit": r.commit} for r in uploaded],
        "sharded": [{"model_id": r.model_id, "ok": r.ok, "error": r.error} for r in sharded_results],
        "upload_writers": upload_writers,
        "events": events,
        "address": cluster.address,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "head_node": cluster.head_node.node_id,
        "gpu_nodes": [w.node_id for w in workers],
        "actors": [
            {"class_name": a.class_name, "node_id": a.node_id, "resources": a.required_resources} for a in first_run
        ],
        "hub_exists": hub.exists(),
    }
    print("REPORT " + json.dumps(report), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _sharded_copy(hub: Path, into: Path, model_id: str) -> Path:
    """``hub``'s NYC dataset with its features as two Parquet shards of sparse rows, and the model ``model_id``."""
    import pyarrow.parquet as pq
    import torch

    from rqvae_ray.core.encoder import SparseRows
    from rqvae_ray.core.rows import sparse_table

    spec = parse_model_ids([model_id])[0]
    shutil.copytree(hub / "models" / spec.org / spec.name, into / "models" / spec.org / spec.name)
    src, dst = hub / "datasets" / "comp5331poi" / "nyc", into / "datasets" / "comp5331poi" / "nyc"
    shutil.copytree(src / "Intermediate Files", dst / "Intermediate Files")
    (dst / "RQVAE Dataset" / "poi_features").mkdir(parents=True)
    shutil.copy(src / "RQVAE Dataset" / "metadata.json", dst / "RQVAE Dataset" / "metadata.json")
    features = torch.load(src / "RQVAE Dataset" / "poi_features.pt", weights_only=True).numpy()
    half = len(features) // 2
    for part, (first, last) in enumerate([(0, half), (half, len(features))]):
        shard = sparse_table(SparseRows.from_dense(features[first:last]), first_pid=first + 1)
        pq.write_table(shard, dst / "RQVAE Dataset" / "poi_features" / f"part-{part:05d}.parquet")
    return into


@pytest.mark.timeout(600, method="signal")
def test_pools_spread_over_fake_gpu_nodes_and_never_read_driver_paths(demo_run, demo_hub, tmp_path, own_ray):
    demo_out, _ = demo_run
    models = [NYC_A, NYC_B]
    # A private hub with only what the run needs; it is deleted once the driver has loaded it (the tests run as
    # root, so taking read permission away would not stop anyone).
    hub = tmp_path / "hub"
    shutil.copytree(demo_hub / "datasets" / "comp5331poi" / "nyc", hub / "datasets" / "comp5331poi" / "nyc")
    for spec in parse_model_ids(models):
        shutil.copytree(demo_hub / "models" / spec.org / spec.name, hub / "models" / spec.org / spec.name)
    hub_copy = tmp_path / "hub_copy"
    shutil.copytree(hub, hub_copy)
    sharded = _sharded_copy(hub, tmp_path / "sharded", models[0])
    out, sharded_out = tmp_path / "out", tmp_path / "sharded_out"
    script = tmp_path / "cluster_run.py"
    script.write_text(CLUSTER_SCRIPT)
    temp_dir = short_temp_dir()
    remote = tmp_path / "remote"
    shutil.copytree(hub / "datasets" / "comp5331poi" / "nyc", remote / "datasets" / "comp5331poi" / "nyc")
    server = HubServer(remote, objects_dir=tmp_path / "objects", token=HUB_TOKEN, lfs_threshold=300_000)
    # Every node's processes start from this environment: each has the Hub's address and a token.
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf_home")}
    env.update(HF_TOKEN=HUB_TOKEN, HF_HUB_DISABLE_XET="1")  # the stand-in speaks HTTP LFS, not Xet
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    started = time.monotonic()
    try:
        with server:
            env["HF_ENDPOINT"] = server.url
            proc = subprocess.run(
                [sys.executable, str(script), *map(str, (hub, hub_copy, sharded, out, sharded_out)), *models],
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
                cwd=REPO,
            )
    finally:
        survivors = kill_ray(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not survivors, f"processes of the simulated cluster survived: {survivors}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    # Cluster() writes its address to $RAY_TMPDIR/ray/ray_current_cluster (and removes it), never to /tmp/ray.
    assert not forget_address(report["address"]), f"the simulated cluster left its address in {DEFAULT_ADDRESS_FILE}"
    assert all(r["ok"] for r in report["results"]), report["results"]

    # The hub was gone before any encoder actor existed: every actor worked from the object store.
    events = report["events"]
    assert not report["hub_exists"]
    removed = events.index("HUB REMOVED")
    assert any("POIs written" in e for e in events[removed + 1 :]), events

    # Two encoder actors, each holding both models and one (fake) GPU, on different GPU nodes; the writer stays with
    # the driver on the head. Ray Data does not wait for a pool's actors, so on a loaded machine the first actor can
    # encode all six blocks before the second is placed: an actor that never started has no node.
    encoders = [a for a in report["actors"] if "EncodeModels" in a["class_name"]]
    assert len(encoders) == 2, report["actors"]
    assert all(a["resources"].get("GPU") == 1.0 for a in encoders), encoders
    placed = [a["node_id"] for a in encoders if a["node_id"] is not None]
    assert placed and len(set(placed)) == len(placed) and set(placed) <= set(report["gpu_nodes"]), (encoders, report)
    writers = [a for a in report["actors"] if a["class_name"] == "WriterActor"]
    assert writers and {a["node_id"] for a in writers} == {report["head_node"]} == {report["driver_node"]}
    assert_same_bytes_as_demo_run(out, demo_out, models)

    # Upload only: one writer per model, spread over the nodes (those not on the driver's pre-upload their files);
    # still one commit, holding every file byte for byte as the single-node run wrote it.
    assert all(r["ok"] for r in report["uploaded"]), report["uploaded"]
    assert len(report["upload_writers"]) == 2 and len(set(report["upload_writers"])) == 2, report
    assert len(server.commits) == 1 and {r["commit"] for r in report["uploaded"]} == {server.commits[0]["oid"]}
    stored = server.repo_dir("comp5331poi/nyc", "dataset") / "LLM Dataset" / "Intermediate Files"
    for model_id in models:
        assert (stored / csv_name(parse_model_ids([model_id])[0])).read_bytes() == output_csv(
            demo_out, model_id
        ).read_bytes()

    # Parquet shards read on a driver's node without CPUs (Ray's advice for a large cluster's head): the same rows.
    assert all(r["ok"] for r in report["sharded"]), report["sharded"]
    spec = parse_model_ids(models[:1])[0]
    parquet = sharded_out / output_csv(sharded_out, models[0]).relative_to(sharded_out).parent
    parquet /= codebooks_filename(spec.name, OutputFormat.PARQUET)
    rows = pa.Table.from_batches(list(iter_codebooks(parquet)))
    assert rows.equals(pa.Table.from_batches(list(iter_codebooks(output_csv(demo_out, models[0])))))
    print(f"simulated cluster: {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------------------------------
# 3. A pool that can never start: one GPU per actor on a CPU-only local Ray.
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impossible_pool(demo_hub, tmp_path_factory):
    """``--gpus-per-model 1 --actor-wait-s 5`` on CPU-only local Ray: (completed process, seconds, out dir)."""
    out = tmp_path_factory.mktemp("no-gpu-out")
    with own_ray_lock(tmp_path_factory):
        started = time.monotonic()
        proc = run_cli(
            NYC_A,
            "--hub-dir",
            str(demo_hub),
            "--out-dir",
            str(out),
            "--gpus-per-model",
            "1",
            "--actor-wait-s",
            "5",
            timeout=120,
        )
        return proc, time.monotonic() - started, out


def error_lines(proc: subprocess.CompletedProcess, model_id: str) -> list[str]:
    return [x for x in proc.stderr.splitlines() if x.startswith("error:") and model_id in x]


@pytest.mark.timeout(300, method="signal")
@pytest.mark.starts_ray  # impossible_pool runs the CLI on a private Ray
def test_a_pool_that_cannot_start_fails_in_bounded_time(impossible_pool):
    proc, seconds, out = impossible_pool
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Ray start-up and loading included: about 16 s on an idle 2-core machine; --actor-wait-s 5 bounds the wait.
    assert seconds < 90, seconds
    assert "0 of 1 models succeeded" in proc.stdout
    (line,) = error_lines(proc, NYC_A)
    assert "actor" in line.lower(), line  # the reason is about the encoder actors that never started
    assert written_csvs(out) == []
    assert not list(out.rglob("*.partial")), "partial files were left behind"


@pytest.mark.timeout(300, method="signal")
@pytest.mark.starts_ray  # impossible_pool runs the CLI on a private Ray
def test_a_pool_that_cannot_start_says_what_it_asked_for_and_what_to_change(impossible_pool):
    proc, _, _ = impossible_pool
    (line,) = error_lines(proc, NYC_A)
    # What the actors asked for, that no node offers it, and which options change that.
    assert "1 GPU" in line and "no node" in line, line
    assert "--gpus-per-actor" in line and "--actor-wait-s" in line, line
    # A configuration problem, not a Ray bug: no traceback, no invitation to report an issue to Ray.
    assert "Traceback" not in proc.stderr and "open an issue" not in proc.stderr, proc.stderr[-3000:]
