"""The token and each dataset repo are checked before any work: a token the Hub refuses or that is read-only stops the
run at once (status 2), a dataset repo that is missing or not writable fails its models before they are encoded."""

from __future__ import annotations

import json
import shutil

import pytest

from rqvae_ray.errors import RepoNotFoundError, RepoNotWritableError, TokenRejectedError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.outputs.upload import check_writable
from rqvae_ray.pipeline.options import check_setup, make_options
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models
from tests.conftest import run_cli, use_hub
from tests.hub_server import HubServer

TOKEN = "hf_tokencheck0123456789abcdefTESTtoken"
REVOKED = "hf_revoked0123456789abcdefghijREVOKEDx"
MODEL = DEFAULT_MODELS[0]  # an NYC model
REPO_ID = "comp5331poi/nyc"


@pytest.fixture()
def root(demo_hub, tmp_path):
    """The stand-in Hub's repos: the NYC dataset and one NYC model."""
    spec = parse_model_id(MODEL)
    root = tmp_path / "remote"
    shutil.copytree(demo_hub / "datasets" / "comp5331poi" / "nyc", root / "datasets" / "comp5331poi" / "nyc")
    shutil.copytree(demo_hub / "models" / spec.org / spec.name, root / "models" / spec.org / spec.name)
    return root


def _no_download(server: HubServer) -> None:
    """Nothing was downloaded: neither the features nor a checkpoint."""
    assert not [path for method, path, _ in server.requests if "/resolve/" in path and method == "GET"]


def test_a_revoked_token_stops_the_run_before_any_work(root, tmp_path):
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN) as server:
        env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": REVOKED}
        proc = run_cli(MODEL, "--out-dir", str(tmp_path / "out"), "--upload", env=env, timeout=120)
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "the Hub rejects the Hugging Face token" in lines[0], proc.stderr
        assert REVOKED not in proc.stdout + proc.stderr
        _no_download(server)
        assert not server.commits
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr


def test_a_read_only_token_stops_the_run_before_any_work(root, tmp_path, monkeypatch):
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN) as server:
        use_hub(monkeypatch, server.url, tmp_path / "cache", TOKEN)
        read_only = {"type": "user", "name": "reader", "auth": {"accessToken": {"role": "read"}}}
        server.inject("GET", "/api/whoami-v2", 200, body=json.dumps(read_only).encode())
        with pytest.raises(TokenRejectedError, match="the Hugging Face token is read-only"):
            check_setup(make_options(out_dir=tmp_path / "out", upload=True))
        check_setup(make_options(out_dir=tmp_path / "out", upload=True))  # a write token passes
        check_setup(make_options(out_dir=tmp_path / "out"))  # writing locally asks nothing of the Hub
        assert [p for _, p, _ in server.requests if "whoami" in p] == ["/api/whoami-v2"] * 2


def test_a_missing_dataset_repo_fails_its_models_before_they_are_encoded(demo_hub, root, tmp_path, monkeypatch):
    shutil.rmtree(root / "datasets")  # the models are read from the demo hub; the Hub has no dataset repo
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN) as server:
        use_hub(monkeypatch, server.url, tmp_path / "cache", TOKEN)
        notes: list[str] = []
        options = make_options(hub_dir=demo_hub, out_dir=tmp_path / "out", upload=True, executor="local")
        [result] = run_models([parse_model_id(MODEL)], options, Progress(notes.append))
        assert not result.ok
        assert result.error.startswith(f"dataset repo {REPO_ID} not found on the Hub"), result.error
        assert not any("POIs" in note for note in notes), notes  # the features were not even loaded
        assert not server.commits


def test_a_dataset_repo_the_token_may_not_write_fails_at_once(root, tmp_path, monkeypatch):
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN) as server:
        use_hub(monkeypatch, server.url, tmp_path / "cache", TOKEN)
        check_writable(REPO_ID)
        server.inject("GET", f"/api/datasets/{REPO_ID}/auth-check/write", 403)
        with pytest.raises(RepoNotWritableError, match=f"may not write to dataset repo {REPO_ID}; use a token"):
            check_writable(REPO_ID)
        with pytest.raises(RepoNotFoundError, match="dataset repo comp5331poi/elsewhere not found on the Hub"):
            check_writable("comp5331poi/elsewhere")
        monkeypatch.setenv("HF_TOKEN", REVOKED)
        with pytest.raises(RepoNotWritableError):
            check_writable(REPO_ID)
        _no_download(server)
