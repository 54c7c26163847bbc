"""The Hub path end to end: the real huggingface_hub client against a local stand-in server on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.inputs.stores import HfHub
from rqvae_ray.pipeline.options import RunOptions
from rqvae_ray.pipeline.progress import Quiet
from rqvae_ray.runner import run_models
from tests.conftest import REPO, run_cli, use_hub
from tests.hub_server import HubServer
from tests.writing import csv_name

SENTINEL = "hf_SENTINEL0123456789abcdefSECRETtoken"
MODELS = [DEFAULT_MODELS[0], DEFAULT_MODELS[2]]  # two NYC models
SPECS = [parse_model_id(m) for m in MODELS]
IN_REPO = "LLM Dataset/Intermediate Files"


@pytest.fixture()
def server(demo_hub, tmp_path):
    """A stand-in Hub serving the NYC dataset and two NYC models of the demo hub."""
    root = tmp_path / "remote"
    shutil.copytree(demo_hub / "datasets" / "comp5331poi" / "nyc", root / "datasets" / "comp5331poi" / "nyc")
    for spec in SPECS:
        shutil.copytree(demo_hub / "models" / spec.org / spec.name, root / "models" / spec.org / spec.name)
    with HubServer(root, objects_dir=tmp_path / "objects", token=SENTINEL) as hub:
        yield hub


@pytest.fixture()
def hub_env(server, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    env = {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_TOKEN": SENTINEL,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "RAY_TMPDIR": str(ray_tmp),
    }
    yield env
    shutil.rmtree(ray_tmp, ignore_errors=True)


def _assert_no_sentinel(*roots: Path, texts: tuple[str, ...] = ()) -> None:
    needle = SENTINEL.encode()
    for text in texts:
        assert SENTINEL not in text
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert needle not in path.read_bytes(), f"token found in {path}"


def test_download_upload_offline_and_token_hygiene(server, hub_env, demo_run, tmp_path):
    local_out, _ = demo_run
    proc = run_cli(*MODELS, "--batch-size", "512", env=hub_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    commits = [c for c in server.commits if c["repo_id"] == "comp5331poi/nyc"]
    assert len(commits) == 1, server.commits
    commit = commits[0]
    assert sorted(commit["paths"]) == sorted(
        [f"{IN_REPO}/{csv_name(s)}" for s in SPECS] + [f"{IN_REPO}/rqvae_ray-manifest.json"]
    )
    for spec in SPECS:
        assert spec.model_id in commit["message"] + commit.get("description", "")
        stored = server.repo_dir("comp5331poi/nyc", "dataset") / IN_REPO / csv_name(spec)
        local = local_out / "datasets" / "comp5331poi" / "nyc" / IN_REPO / csv_name(spec)
        assert stored.read_bytes() == local.read_bytes()
    assert server.head(SPECS[0].model_id) in commit.get("description", "")
    assert "uploaded" in proc.stdout
    # Another upload-only run, another format: the repo's manifest keeps the CSVs' entries beside the Parquet one.
    parquet = run_cli(MODELS[0], "--format", "parquet", env=hub_env)
    assert parquet.returncode == 0, parquet.stdout[-2000:] + parquet.stderr[-2000:]
    manifest = server.repo_dir("comp5331poi/nyc", "dataset") / IN_REPO / "rqvae_ray-manifest.json"
    parquet_name = csv_name(SPECS[0]).removesuffix(".csv") + ".parquet"
    assert sorted(json.loads(manifest.read_text())["files"]) == sorted([csv_name(s) for s in SPECS] + [parquet_name])

    # Offline, from the cache: same bytes written locally.
    offline_out = tmp_path / "offline"
    proc_off = run_cli(*MODELS, "--out-dir", str(offline_out), env={**hub_env, "HF_HUB_OFFLINE": "1"})
    assert proc_off.returncode == 0, proc_off.stdout[-2000:] + proc_off.stderr[-2000:]
    for spec in SPECS:
        got = offline_out / "datasets" / "comp5331poi" / "nyc" / IN_REPO / csv_name(spec)
        assert (
            got.read_bytes() == (local_out / "datasets" / "comp5331poi" / "nyc" / IN_REPO / csv_name(spec)).read_bytes()
        )
    # Offline, a model that was never downloaded: one clear line naming the repo and the file.
    missing = DEFAULT_MODELS[3]
    proc_miss = run_cli(missing, "--out-dir", str(tmp_path / "miss"), env={**hub_env, "HF_HUB_OFFLINE": "1"})
    assert proc_miss.returncode == 1
    assert f"model repo {missing}" in proc_miss.stderr and "rqvae_best.pt" in proc_miss.stderr
    assert "not in the local cache" in proc_miss.stderr
    assert "Traceback" not in proc_miss.stderr

    _assert_no_sentinel(
        Path(hub_env["HF_HOME"]),
        server.root,
        offline_out,
        Path(hub_env["RAY_TMPDIR"]),
        texts=tuple(t for p in (proc, parquet, proc_off, proc_miss) for t in (p.stdout, p.stderr)),
    )


def test_pinned_revision_is_used_and_recorded(server, demo_hub, demo_run, tmp_path, monkeypatch):
    # In-process (the driver alone reads the Hub when writing locally): this process's huggingface_hub at the server.
    use_hub(monkeypatch, server.url, tmp_path / "hf_cache", SENTINEL)
    local_out, _ = demo_run
    spec = SPECS[0]
    first = server.head(spec.model_id)
    # A later commit replaces the model's weights with the other model's.
    shutil.copy(demo_hub / "models" / spec.org / SPECS[1].name / "rqvae_best.pt", server.repo_dir(spec.model_id))
    server.rescan("swap weights")
    latest = server.head(spec.model_id)
    assert latest != first
    dataset_rev = server.head("comp5331poi/nyc", "dataset")

    def run(revision: str, out: Path):
        options = RunOptions(hub=HfHub(revision, dataset_rev), out_dir=str(out))
        return run_models([spec], options, Quiet())[0]

    for revision, source in {first: SPECS[0], latest: SPECS[1]}.items():
        out = tmp_path / revision
        result = run(revision, out)
        assert result.ok, result.error
        folder = out / "datasets" / "comp5331poi" / "nyc" / IN_REPO
        reference = local_out / "datasets" / "comp5331poi" / "nyc" / IN_REPO / csv_name(source)
        assert (folder / csv_name(spec)).read_bytes() == reference.read_bytes()
        entry = json.loads((folder / "rqvae_ray-manifest.json").read_text())["files"][csv_name(spec)]
        assert entry["checkpoint_revision"] == revision
        assert entry["features_revision"] == dataset_rev
    result = run("0" * 40, tmp_path / "x")
    assert not result.ok and f"model repo {spec.model_id} has no revision" in result.error


def test_transient_download_and_upload_errors_are_retried(server, hub_env, tmp_path):
    server.inject("GET", "rqvae_best.pt", 503, times=2)
    server.inject("POST", "/commit/", 503, times=2)
    server.inject("POST", "/commit/", 429, times=1)
    # The retries' waits (1, 2, then 1, 2, 4 s by default) shortened: the statuses show the retries.
    proc = run_cli(MODELS[0], "--dataset", "nyc", "--retry-backoff-s", "0.05", env=hub_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    statuses = [s for m, p, s in server.requests if m == "POST" and "/commit/" in p]
    assert statuses == [503, 503, 429, 200]
    downloads = [s for m, p, s in server.requests if m == "GET" and p.endswith("rqvae_best.pt")]
    assert downloads == [503, 503, 200]
    assert len([c for c in server.commits if c["repo_id"] == "comp5331poi/nyc"]) == 1


def test_permanent_upload_error_keeps_local_files(server, hub_env, tmp_path):
    server.inject("POST", "/commit/", 403, times=50)
    out = tmp_path / "out"
    proc = run_cli(MODELS[0], "--out-dir", str(out), "--upload", env=hub_env)
    assert proc.returncode == 1
    assert "HTTP 403" in proc.stderr and "kept in" in proc.stderr
    kept = out / "datasets" / "comp5331poi" / "nyc" / IN_REPO / csv_name(SPECS[0])
    assert kept.is_file() and kept.stat().st_size > 0
    assert not server.commits
    # upload-only: the finished files stay in a temporary folder that the error names
    proc2 = run_cli(MODELS[0], env=hub_env)
    assert proc2.returncode == 1
    kept_dir = proc2.stderr.split("kept in ")[1].splitlines()[0].strip()
    assert (Path(kept_dir) / csv_name(SPECS[0])).is_file()
    shutil.rmtree(Path(kept_dir).parents[4], ignore_errors=True)
    _assert_no_sentinel(out, texts=(proc.stdout, proc.stderr, proc2.stdout, proc2.stderr))


def test_missing_token_is_reported_before_inference(server, hub_env, tmp_path):
    env = {**hub_env, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "empty_home")}
    proc = run_cli(MODELS[0], env=env, timeout=120)
    assert proc.returncode == 2
    assert "needs a Hugging Face token" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr


PYTHON_API = """
import sys
from rqvae_ray import BatchInferenceManager, BatchInferenceProcessor, ModelConfigParser
from tests.writing import csv_name
assert ModelConfigParser.parse_model_name(sys.argv[1])["dataset_name"] == "NYC"
manager = BatchInferenceManager(hf_token=sys.argv[3])
assert len(manager.get_model_list()) == 10 and len(manager.get_nyc_models()) == 5
results = manager.process_models([sys.argv[1], sys.argv[2]])
assert [r.ok for r in results] == [True, True], results
local = BatchInferenceProcessor(hf_token=sys.argv[3], out_dir=sys.argv[4]).process_model(sys.argv[1])
assert local.rows == 5135 and local.path.startswith(sys.argv[4])
print("API-OK", results[0].commit)
"""


def test_python_api_end_to_end(server, hub_env, tmp_path):
    env = {**hub_env, "HF_TOKEN": ""}
    proc = subprocess.run(
        [sys.executable, "-c", PYTHON_API, MODELS[0], MODELS[1], SENTINEL, str(tmp_path / "api_out")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, **env},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "API-OK" in proc.stdout
    assert len([c for c in server.commits if c["repo_id"] == "comp5331poi/nyc"]) == 1
    assert server.saw_token(SENTINEL)
    _assert_no_sentinel(tmp_path / "api_out", texts=(proc.stdout, proc.stderr))
