"""The stores, in process: ``LocalHub`` on a directory, ``HfHub`` through the real client against the stand-in Hub.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_OFFLINE`` into ``huggingface_hub.constants`` at
import time; the ``hf`` fixture sets those constants for one test instead, and one subprocess test checks that the
environment variables themselves reach ``HfHub`` the same way. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from rqvae_ray.errors import FileNotInRepoError, NotCachedError, RepoNotFoundError, ResourceNotFoundError
from rqvae_ray.inputs import retry
from rqvae_ray.inputs.model_ids import parse_model_id
from rqvae_ray.inputs.stores import (
    CHECKPOINT_FILE,
    FEATURES_FILE,
    FEATURES_PARQUET_DIR,
    METADATA_FILE,
    PID_MAPPING_FILE,
    DatasetFiles,
    HfHub,
    LocalHub,
)
from rqvae_ray.outputs.upload import ManifestUpdate, commit_files
from tests.conftest import REPO, use_hub
from tests.hub_server import HubServer

pytestmark = pytest.mark.timeout(60)

SENTINEL = "hf_SENTINEL_stores_0123456789abcdefSECRET"
ORG = "test-org"
MODEL = parse_model_id(f"{ORG}/rqvae-nyc-div0.25-commit0.5-lr5e-5")
NO_CHECKPOINT = parse_model_id(f"{ORG}/rqvae-nyc-div0.5-commit0.5-lr5e-5")  # a repo without rqvae_best.pt
UNKNOWN = parse_model_id(f"{ORG}/rqvae-tky-div0.75-commit0.25-lr5e-5")
SHARD_NAMES = ["part-00001.parquet", "part-00002.parquet", "part-00010.parquet"]
# The stores never parse what they hand out, so the files hold recognisable bytes, not real tensors or tables.
PT_DATASET = {
    FEATURES_FILE: b"pt-features-v1" * 300,
    METADATA_FILE: b'{"total_dim": 7}\n',
    PID_MAPPING_FILE: b"Original_Pid,Mapped_Pid\n10,1\n20,2\n",
}
SHARD_DATASET = {
    # Written out of order; a folder named like a shard and a stray file are not shards.
    f"{FEATURES_PARQUET_DIR}/part-00010.parquet": b"shard-10",
    f"{FEATURES_PARQUET_DIR}/part-00001.parquet": b"shard-01",
    f"{FEATURES_PARQUET_DIR}/part-00002.parquet": b"shard-02",
    f"{FEATURES_PARQUET_DIR}/old.parquet/part-0.parquet": b"nested",
    f"{FEATURES_PARQUET_DIR}/README.md": b"not a shard",
    METADATA_FILE: b'{"total_dim": 9}\n',
    PID_MAPPING_FILE: b"Original_Pid,Mapped_Pid\n5,1\n",
}


def _write(base: Path, files: dict[str, bytes]) -> None:
    for relative, data in files.items():
        (base / relative).parent.mkdir(parents=True, exist_ok=True)
        (base / relative).write_bytes(data)


@pytest.fixture()
def hub_root(tmp_path: Path) -> Path:
    """A hub in the layout both stores read: one model, a .pt dataset, a sharded one, and incomplete repos."""
    root = tmp_path / "hub"
    _write(root / "models" / ORG / MODEL.name, {CHECKPOINT_FILE: b"checkpoint-v1" * 100})
    _write(root / "models" / ORG / NO_CHECKPOINT.name, {"README.md": b"weights not uploaded yet\n"})
    _write(root / "datasets" / ORG / "nyc", PT_DATASET)
    _write(root / "datasets" / ORG / "shards", SHARD_DATASET)
    _write(root / "datasets" / ORG / "bare", {FEATURES_FILE: b"bare-features"})
    _write(root / "datasets" / ORG / "nofeatures", {METADATA_FILE: b"{}", PID_MAPPING_FILE: b"Mapped_Pid\n"})
    return root


@pytest.fixture()
def server(hub_root: Path, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(hub_root, objects_dir=tmp_path / "objects", token=SENTINEL) as hub:
        yield hub


@pytest.fixture()
def hf(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """Point this process's huggingface_hub at ``server``, with an empty cache of its own and a sentinel token."""
    use_hub(monkeypatch, server.url, tmp_path / "hf_cache", SENTINEL)
    return server


@pytest.fixture()
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Seconds slept (by our retries and the client's own), recorded instead of slept."""
    recorded: list[float] = []
    monkeypatch.setattr(retry.time, "sleep", recorded.append)
    return recorded


@pytest.fixture(params=["local", "hf"])
def store(request: pytest.FixtureRequest, hub_root: Path) -> LocalHub | HfHub:
    """Each store in turn, reading the same hub (``hf``: served by the stand-in)."""
    if request.param == "local":
        return LocalHub(hub_root)
    request.getfixturevalue("hf")
    return HfHub()


def _revision(store: LocalHub | HfHub, request: pytest.FixtureRequest, repo: str, repo_type: str) -> str:
    """The revision ``store`` should report for a repo: ``local``, or the stand-in's head commit."""
    return "local" if isinstance(store, LocalHub) else request.getfixturevalue("server").head(repo, repo_type)


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes()


def _statuses(server: HubServer, method: str, path_end: str) -> list[int]:
    return [status for m, path, status in server.requests if m == method and path.endswith(path_end)]


# --------------------------------------------------------------------------- the layout contract, both stores


def test_checkpoint_bytes_and_revision(store: LocalHub | HfHub, request: pytest.FixtureRequest) -> None:
    data, revision = store.checkpoint(MODEL)
    assert data == b"checkpoint-v1" * 100
    assert revision == _revision(store, request, MODEL.model_id, "model")


def test_pt_dataset_files(store: LocalHub | HfHub, request: pytest.FixtureRequest) -> None:
    files = store.dataset_files(ORG, "nyc")
    assert isinstance(files, DatasetFiles) and files.repo == f"{ORG}/nyc" and not files.is_parquet
    assert [p.as_posix().endswith(FEATURES_FILE) for p in files.features] == [True]
    assert [_read(p) for p in files.features] == [PT_DATASET[FEATURES_FILE]]
    assert _read(files.metadata) == PT_DATASET[METADATA_FILE]
    assert _read(files.pid_mapping) == PT_DATASET[PID_MAPPING_FILE]
    assert files.revision == _revision(store, request, f"{ORG}/nyc", "dataset")


def test_parquet_shards_in_file_name_order(store: LocalHub | HfHub, request: pytest.FixtureRequest) -> None:
    files = store.dataset_files(ORG, "shards")
    assert files.is_parquet
    assert [p.name for p in files.features] == SHARD_NAMES
    assert [p.parent.as_posix().endswith(FEATURES_PARQUET_DIR) for p in files.features] == [True] * 3
    assert [_read(p) for p in files.features] == [b"shard-01", b"shard-02", b"shard-10"]
    assert _read(files.metadata) == SHARD_DATASET[METADATA_FILE]
    assert _read(files.pid_mapping) == SHARD_DATASET[PID_MAPPING_FILE]
    assert files.revision == _revision(store, request, f"{ORG}/shards", "dataset")


def test_missing_metadata_and_mapping_are_none(store: LocalHub | HfHub) -> None:
    files = store.dataset_files(ORG, "bare")
    assert [_read(p) for p in files.features] == [b"bare-features"]
    assert files.metadata is None and files.pid_mapping is None


def test_dataset_without_features(store: LocalHub | HfHub) -> None:
    with pytest.raises(FileNotInRepoError) as excinfo:
        store.dataset_files(ORG, "nofeatures")
    assert (excinfo.value.repo, excinfo.value.filename) == (f"{ORG}/nofeatures", FEATURES_FILE)
    message = str(excinfo.value)
    assert f"{ORG}/nofeatures" in message and "poi_features.pt" in message and "parquet" in message


def test_unknown_model_and_dataset(store: LocalHub | HfHub) -> None:
    with pytest.raises(RepoNotFoundError) as excinfo:
        store.checkpoint(UNKNOWN)
    assert excinfo.value.repo == UNKNOWN.model_id and UNKNOWN.model_id in str(excinfo.value)
    with pytest.raises(RepoNotFoundError) as excinfo:
        store.dataset_files(ORG, "tky")
    assert excinfo.value.repo == f"{ORG}/tky" and f"{ORG}/tky" in str(excinfo.value)


def test_model_repo_without_checkpoint(store: LocalHub | HfHub) -> None:
    with pytest.raises(FileNotInRepoError) as excinfo:
        store.checkpoint(NO_CHECKPOINT)
    assert (excinfo.value.repo, excinfo.value.filename) == (NO_CHECKPOINT.model_id, CHECKPOINT_FILE)
    assert NO_CHECKPOINT.model_id in str(excinfo.value) and CHECKPOINT_FILE in str(excinfo.value)


# --------------------------------------------------------------------------- LocalHub


def test_local_hub_directory_must_exist(tmp_path: Path) -> None:
    with pytest.raises(RepoNotFoundError) as excinfo:
        LocalHub(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(excinfo.value) and "--hub-dir" in str(excinfo.value)


def test_local_hub_refuses_paths_outside_its_root(hub_root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _write(outside / "model", {CHECKPOINT_FILE: b"not from the hub"})
    _write(outside / "dataset", PT_DATASET)
    escaping = parse_model_id(f"{ORG}/rqvae-nyc-escape")
    (hub_root / "models" / ORG / escaping.name).symlink_to(outside / "model")
    (hub_root / "datasets" / ORG / "escape").symlink_to(outside / "dataset")
    hub = LocalHub(hub_root)
    for call, repo in (
        (lambda: hub.checkpoint(escaping), escaping.model_id),
        (lambda: hub.dataset_files(ORG, "escape"), f"{ORG}/escape"),
        (lambda: hub.dataset_files("..", ".."), "../.."),
    ):
        with pytest.raises(RepoNotFoundError) as excinfo:
            call()
        assert excinfo.value.repo == repo and "outside the hub directory" in str(excinfo.value)


# --------------------------------------------------------------------------- HfHub


def test_pinned_model_revision(hf: HubServer, hub_root: Path) -> None:
    first = hf.head(MODEL.model_id)
    (hub_root / "models" / ORG / MODEL.name / CHECKPOINT_FILE).write_bytes(b"checkpoint-v2")
    (latest,) = hf.rescan("new weights")
    assert HfHub(revision=first).checkpoint(MODEL) == (b"checkpoint-v1" * 100, first)
    assert HfHub().checkpoint(MODEL) == (b"checkpoint-v2", latest)
    # The model revision is not the dataset's: datasets are still read at their own head.
    assert HfHub(revision=first).dataset_files(ORG, "nyc").revision == hf.head(f"{ORG}/nyc", "dataset")


def test_pinned_dataset_revision(hf: HubServer, hub_root: Path) -> None:
    pt_first, shards_first = hf.head(f"{ORG}/nyc", "dataset"), hf.head(f"{ORG}/shards", "dataset")
    (hub_root / "datasets" / ORG / "nyc" / METADATA_FILE).write_bytes(b'{"total_dim": 8}\n')
    (hub_root / "datasets" / ORG / "shards" / FEATURES_PARQUET_DIR / "part-00020.parquet").write_bytes(b"shard-20")
    assert len(hf.rescan("later build")) == 2

    old = HfHub(dataset_revision=pt_first).dataset_files(ORG, "nyc")
    assert (old.revision, _read(old.metadata)) == (pt_first, PT_DATASET[METADATA_FILE])
    new = HfHub().dataset_files(ORG, "nyc")
    assert (new.revision, _read(new.metadata)) == (hf.head(f"{ORG}/nyc", "dataset"), b'{"total_dim": 8}\n')

    old_shards = HfHub(dataset_revision=shards_first).dataset_files(ORG, "shards")
    assert old_shards.revision == shards_first and [p.name for p in old_shards.features] == SHARD_NAMES
    new_shards = HfHub().dataset_files(ORG, "shards")
    assert [p.name for p in new_shards.features] == [*SHARD_NAMES, "part-00020.parquet"]
    assert new_shards.revision == hf.head(f"{ORG}/shards", "dataset")


def test_unknown_revision(hf: HubServer) -> None:
    missing = "0" * 40
    with pytest.raises(RepoNotFoundError) as excinfo:
        HfHub(revision=missing).checkpoint(MODEL)
    assert excinfo.value.repo == MODEL.model_id
    assert f"model repo {MODEL.model_id} has no revision {missing!r}" in str(excinfo.value)
    assert "--revision" in str(excinfo.value)
    for dataset in ("nyc", "shards"):
        with pytest.raises(RepoNotFoundError) as excinfo:
            HfHub(dataset_revision="no-such-branch").dataset_files(ORG, dataset)
        assert excinfo.value.repo == f"{ORG}/{dataset}" and "'no-such-branch'" in str(excinfo.value)
        assert "--dataset-revision" in str(excinfo.value)


def test_offline_and_not_cached(hf: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(NotCachedError) as excinfo:
        HfHub().checkpoint(MODEL)
    assert (excinfo.value.repo, excinfo.value.filename) == (MODEL.model_id, CHECKPOINT_FILE)
    assert f"model repo {MODEL.model_id}" in str(excinfo.value) and "not in the local cache" in str(excinfo.value)
    assert "HF_HUB_OFFLINE" in str(excinfo.value)
    for dataset in ("nyc", "shards"):
        with pytest.raises(NotCachedError) as excinfo:
            HfHub().dataset_files(ORG, dataset)
        assert (excinfo.value.repo, excinfo.value.filename) == (f"{ORG}/{dataset}", FEATURES_FILE)
    assert hf.requests == []


def test_offline_reads_the_cache(hf: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    online = HfHub()
    checkpoint = online.checkpoint(MODEL)
    datasets = {name: online.dataset_files(ORG, name) for name in ("nyc", "shards")}
    hf.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = HfHub()
    assert offline.checkpoint(MODEL) == checkpoint
    for name, files in datasets.items():  # a sharded dataset too, although it has no .pt to find in the cache
        assert offline.dataset_files(ORG, name) == files
    pinned = HfHub(revision=checkpoint[1], dataset_revision=datasets["shards"].revision)
    assert pinned.checkpoint(MODEL) == checkpoint
    assert pinned.dataset_files(ORG, "shards") == datasets["shards"]


def test_transient_download_errors_are_retried(hf: HubServer, sleeps: list[float]) -> None:
    hf.inject("GET", CHECKPOINT_FILE, 503, times=2)
    hf.inject("GET", "part-00002.parquet", 502, times=1)
    assert HfHub().checkpoint(MODEL)[0] == b"checkpoint-v1" * 100
    assert _statuses(hf, "GET", f"/{CHECKPOINT_FILE}") == [503, 503, 200]
    assert [p.name for p in HfHub().dataset_files(ORG, "shards").features] == SHARD_NAMES
    assert _statuses(hf, "GET", "/part-00002.parquet") == [502, 200]
    assert sleeps == [1.0, 2.0, 1.0]


def test_download_retries_wait_the_backoff_they_are_given(hf: HubServer, sleeps: list[float]) -> None:
    hf.inject("GET", CHECKPOINT_FILE, 503, times=3)
    assert HfHub(backoff_s=0.25).checkpoint(MODEL)[0] == b"checkpoint-v1" * 100
    assert sleeps == [0.25, 0.5, 1.0]


def test_persistent_server_error_gives_up_after_the_retries(hf: HubServer, sleeps: list[float]) -> None:
    hf.inject("GET", CHECKPOINT_FILE, 503, times=50, headers={"X-Error-Message": "Service is overloaded"})
    with pytest.raises(NotCachedError) as excinfo:
        HfHub().checkpoint(MODEL)
    assert (excinfo.value.repo, excinfo.value.filename) == (MODEL.model_id, CHECKPOINT_FILE)
    assert "HTTP 503: Service is overloaded" in str(excinfo.value)
    assert _statuses(hf, "GET", f"/{CHECKPOINT_FILE}") == [503] * 6
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0]


@pytest.mark.parametrize("method", ["HEAD", "GET"])
def test_refused_download_is_not_retried_and_says_why(hf: HubServer, sleeps: list[float], method: str) -> None:
    hf.inject(method, CHECKPOINT_FILE, 403, times=50, headers={"X-Error-Message": "Access is restricted"})
    with pytest.raises(NotCachedError) as excinfo:
        HfHub().checkpoint(MODEL)
    assert "HTTP 403: Access is restricted" in str(excinfo.value)
    assert "offline" not in str(excinfo.value)
    assert _statuses(hf, method, f"/{CHECKPOINT_FILE}") == [403]
    assert sleeps == []
    assert hf.saw_token(SENTINEL) and SENTINEL not in str(excinfo.value)


def test_errors_never_hold_the_token(hf: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    messages = []
    for call in (
        lambda: HfHub().checkpoint(UNKNOWN),
        lambda: HfHub().checkpoint(NO_CHECKPOINT),
        lambda: HfHub(revision="nope").checkpoint(MODEL),
        lambda: HfHub().dataset_files(ORG, "nofeatures"),
    ):
        with pytest.raises(ResourceNotFoundError) as excinfo:
            call()
        messages.append(str(excinfo.value))
    assert hf.saw_token(SENTINEL)
    assert all(SENTINEL not in message and "\n" not in message for message in messages)


_ENV_SCRIPT = """
import json, sys
from huggingface_hub import constants
from rqvae_ray.inputs.model_ids import parse_model_id
from rqvae_ray.outputs.upload import ManifestUpdate, commit_files
from rqvae_ray.inputs.stores import HfHub

hub = HfHub()
data, revision = hub.checkpoint(parse_model_id(sys.argv[1]))
files = hub.dataset_files(*sys.argv[2].split("/"))
print(json.dumps({
    "offline": constants.HF_HUB_OFFLINE, "checkpoint": data.decode(), "revision": revision,
    "features": [str(p) for p in files.features], "dataset_revision": files.revision,
}))
"""


def test_hf_endpoint_hf_home_and_offline_environment(server: HubServer, tmp_path: Path) -> None:
    """In a fresh process the real environment variables configure HfHub, as the ``hf`` fixture does in process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": SENTINEL}

    def run(extra: dict[str, str]) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", _ENV_SCRIPT, MODEL.model_id, f"{ORG}/shards"],
            env={**env, **extra},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=45,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert SENTINEL not in proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    online = run({})
    assert online["offline"] is False and online["checkpoint"] == "checkpoint-v1" * 100
    assert online["revision"] == server.head(MODEL.model_id)
    assert online["dataset_revision"] == server.head(f"{ORG}/shards", "dataset")
    assert all(p.startswith(str(tmp_path / "hf_home")) for p in online["features"])
    served = len(server.requests)
    server.stop()
    offline = run({"HF_HUB_OFFLINE": "1"})
    assert offline == {**online, "offline": True}
    assert len(server.requests) == served


def test_a_commit_keeps_the_manifest_entries_of_a_commit_that_landed_first(hf: HubServer, tmp_path: Path) -> None:
    """The manifest is read at the branch head and committed on that head only: another run's commit that lands in
    between makes this one read and update the manifest again, so neither run's entries are lost."""
    repo, manifest = f"{ORG}/nyc", "LLM Dataset/Intermediate Files/rqvae_ray-manifest.json"
    local = tmp_path / "ours.csv"
    local.write_text("Pid,Codebook,Vector\n")
    seen: list[bytes | None] = []

    def ours(current: bytes | None) -> bytes:
        seen.append(current)
        if len(seen) == 1:  # another run commits its manifest while this one prepares its commit
            commit_files(repo, [], "another run", manifest=ManifestUpdate(manifest, lambda _: b'{"theirs": 1}'))
        return json.dumps({**json.loads(current or b"{}"), "ours": 1}).encode()

    oid = commit_files(
        repo, [(local, "LLM Dataset/Intermediate Files/ours.csv")], "ours", manifest=ManifestUpdate(manifest, ours)
    )
    assert seen == [None, b'{"theirs": 1}']
    assert oid == hf.head(repo, "dataset") and len(hf.history(repo, "dataset")) == 3
    assert json.loads((hf.repo_dir(repo, "dataset") / manifest).read_bytes()) == {"theirs": 1, "ours": 1}
