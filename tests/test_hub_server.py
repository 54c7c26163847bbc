"""Tests proving that :mod:`hub_server` works with the real ``huggingface_hub`` client (2.4.0).

How the client is pointed at the stand-in (``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME``,
``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` into ``huggingface_hub.constants`` once, at import time):

* in-process tests pass ``endpoint=server.url`` to ``HfApi`` and ``hf_hub_download`` (both accept it) and an
  explicit ``cache_dir`` (the default cache dir was fixed at import from ``HF_HOME``);
* tests that need the environment variables themselves (``HF_ENDPOINT`` without ``endpoint=``,
  ``HF_HUB_OFFLINE=1``, ``HF_HUB_DISABLE_XET=1``) run the client in a fresh ``python`` subprocess.

Retry behaviour of the client (``huggingface_hub`` 2.4.0) that these tests pin down. ``http_backoff`` retries
408/429/500/502/503/504 up to 5 times (``utils/_http.py:466``), sleeping 1, 2, 4, 8 s or ``Retry-After + 1`` s:

* retried: ``POST .../preupload/...`` (``_commit_api.py:762``), LFS batch/verify/PUT (``lfs.py:206,303,367``), tree
  listing (``utils/_pagination.py:41``), the ``upload_folder`` commit POST (``_upload_pipeline.py:666``, the path
  taken when ``hf_xet`` is installed), and the ``HEAD /resolve`` call, on a second pass only, when no cached copy exists
  (``file_download.py:1188``);
* ``GET /resolve`` (the download itself) is retried on 408/429 only (``file_download.py:398``);
* not retried: the commit POST of ``create_commit``/``upload_file`` (``hf_api.py:5280`` -> ``_commit_api.py:1067``),
  ``model_info``/``dataset_info``/``repo_info`` (``hf_api.py:3214,3284``) and ``create_repo`` (``hf_api.py:4752``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

try:
    from tests.hub_server import HubServer
except ImportError:  # tests/ is not a package: pytest put tests/ itself on sys.path
    from hub_server import HubServer

pytestmark = pytest.mark.timeout(60)

SENTINEL_TOKEN = "hf_SENTINEL_never_persist_me_7f3a9c"
MODEL_ID = "test-org/test-model"
DATASET_ID = "test-org/test-dataset"
MODEL_FILES = {
    "config.json": b'{"codebook_size": 256}\n',
    "checkpoints/rqvae.pt": bytes(range(256)) * 64,
}
DATASET_FILES = {
    "RQVAE Dataset/poi_features.pt": b"poi-features-v1" * 500,
    "Intermediate Files/pid_mapping.csv": b"pid,poi\n1,10\n2,20\n",
    "LLM Dataset/Intermediate Files/codebooks-x.csv": b"pid,c0,c1\n1,3,4\n",
}

_CLIENT_SCRIPT = r"""
import hashlib, json, sys
from huggingface_hub import constants, hf_hub_download

out = {"endpoint": constants.ENDPOINT, "offline": constants.HF_HUB_OFFLINE, "files": []}
for repo_id, repo_type, filename, revision in json.loads(sys.argv[1]):
    path = hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)
    with open(path, "rb") as f:
        out["files"].append([path, hashlib.sha256(f.read()).hexdigest()])
print(json.dumps(out))
"""

_LFS_UPLOAD_SCRIPT = r"""
import json, sys
from huggingface_hub import CommitOperationAdd, HfApi, constants

repo_id, local_path, path_in_repo = sys.argv[1:4]
info = HfApi().create_commit(
    repo_id,
    repo_type="dataset",
    operations=[CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=local_path)],
    commit_message="LFS upload with xet disabled",
)
print(json.dumps({"oid": info.oid, "xet_disabled": constants.HF_HUB_DISABLE_XET, "endpoint": constants.ENDPOINT}))
"""


def _write_files(base: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        target = base / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _statuses(server: HubServer, method: str, path_substring: str) -> list[int]:
    return [status for m, path, status in server.requests if m == method and path_substring in path]


def _run_python(script: str, args: list[str], env: dict[str, str]) -> dict:
    """Run ``script`` in a fresh interpreter (so import-time env vars apply) and parse its JSON output."""
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        env={**clean_env, "HF_HUB_DISABLE_TELEMETRY": "1", **env},
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub_root(tmp_path: Path) -> Path:
    root = tmp_path / "hub"
    _write_files(root / "models" / MODEL_ID, MODEL_FILES)
    _write_files(root / "datasets" / DATASET_ID, DATASET_FILES)
    return root


@pytest.fixture
def server(hub_root: Path):
    with HubServer(hub_root) as srv:
        yield srv


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Per-test HF_HOME (effective in subprocesses; in-process calls also get ``cache_dir=hf_home / 'hub'``)."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return home


@pytest.fixture
def api(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HfApi:
    monkeypatch.setenv("HF_ENDPOINT", server.url)  # documents intent; the in-process client needs endpoint=
    return HfApi(endpoint=server.url, token=SENTINEL_TOKEN)


def test_download_model_and_dataset_files_by_branch(server: HubServer, hf_home: Path) -> None:
    cache = hf_home / "hub"
    model_path = hf_hub_download(MODEL_ID, "config.json", endpoint=server.url, cache_dir=cache)
    assert Path(model_path).read_bytes() == MODEL_FILES["config.json"]
    nested = hf_hub_download(MODEL_ID, "checkpoints/rqvae.pt", revision="main", endpoint=server.url, cache_dir=cache)
    assert Path(nested).read_bytes() == MODEL_FILES["checkpoints/rqvae.pt"]

    for filename, data in DATASET_FILES.items():
        path = hf_hub_download(DATASET_ID, filename, repo_type="dataset", endpoint=server.url, cache_dir=cache)
        assert Path(path).read_bytes() == data
        assert Path(path).as_posix().endswith(filename)  # spaces survive URL quoting and the cache layout

    head = server.head(DATASET_ID, "dataset")
    assert (cache / "datasets--test-org--test-dataset" / "refs" / "main").read_text() == head
    assert _statuses(server, "HEAD", "/datasets/test-org/test-dataset/resolve/main/Intermediate Files/") == [200]
    assert _statuses(server, "GET", "/test-org/test-model/resolve/main/config.json") == [200]


def test_download_pinned_old_commit_after_later_commit(server: HubServer, api: HfApi, hf_home: Path) -> None:
    filename = "RQVAE Dataset/poi_features.pt"
    old_sha = server.head(DATASET_ID, "dataset")
    new_bytes = b"poi-features-v2" * 700
    info = api.create_commit(
        DATASET_ID,
        repo_type="dataset",
        operations=[CommitOperationAdd(filename, new_bytes)],
        commit_message="Update POI features",
    )
    assert info.oid == server.head(DATASET_ID, "dataset") != old_sha
    assert server.history(DATASET_ID, "dataset") == [old_sha, info.oid]
    assert (server.repo_dir(DATASET_ID, "dataset") / filename).read_bytes() == new_bytes

    cache = hf_home / "hub"
    latest = hf_hub_download(DATASET_ID, filename, repo_type="dataset", endpoint=server.url, cache_dir=cache)
    assert Path(latest).read_bytes() == new_bytes
    pinned = hf_hub_download(
        DATASET_ID, filename, repo_type="dataset", revision=old_sha, endpoint=server.url, cache_dir=cache
    )
    assert Path(pinned).read_bytes() == DATASET_FILES[filename]
    assert old_sha in Path(pinned).parts
    assert _statuses(server, "HEAD", f"/resolve/{old_sha}/{filename}") == [200]

    assert api.dataset_info(DATASET_ID, revision=old_sha).sha == old_sha
    assert api.repo_info(DATASET_ID, repo_type="dataset").sha == info.oid


def test_repo_info_list_files_and_not_found_errors(server: HubServer, api: HfApi, hf_home: Path) -> None:
    model = api.model_info(MODEL_ID)
    assert model.sha == server.head(MODEL_ID)
    assert sorted(s.rfilename for s in model.siblings) == sorted(MODEL_FILES)

    dataset = api.repo_info(DATASET_ID, repo_type="dataset", files_metadata=True)
    sizes = {s.rfilename: s.size for s in dataset.siblings}
    assert sizes == {name: len(data) for name, data in DATASET_FILES.items()}
    assert sorted(api.list_repo_files(DATASET_ID, repo_type="dataset")) == sorted(DATASET_FILES)
    top_level = {entry.path for entry in api.list_repo_tree(DATASET_ID, repo_type="dataset")}
    assert top_level == {"RQVAE Dataset", "Intermediate Files", "LLM Dataset"}

    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("test-org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(MODEL_ID, revision="f" * 40)
    cache = hf_home / "hub"
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("test-org/missing", "x.csv", repo_type="dataset", endpoint=server.url, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(MODEL_ID, "config.json", revision="no-such-branch", endpoint=server.url, cache_dir=cache)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(MODEL_ID, "missing file.bin", endpoint=server.url, cache_dir=cache)


def test_snapshot_download_by_branch_and_commit(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    old_sha = server.head(DATASET_ID, "dataset")
    api.create_commit(
        DATASET_ID,
        repo_type="dataset",
        operations=[CommitOperationAdd("Intermediate Files/pid_mapping.csv", b"pid,poi\n9,90\n")],
        commit_message="Change mapping",
    )
    old = Path(
        snapshot_download(
            DATASET_ID, repo_type="dataset", revision=old_sha, endpoint=server.url, cache_dir=tmp_path / "c"
        )
    )
    new = Path(snapshot_download(DATASET_ID, repo_type="dataset", endpoint=server.url, cache_dir=tmp_path / "c"))
    assert {p.relative_to(old).as_posix(): p.read_bytes() for p in old.rglob("*") if p.is_file()} == DATASET_FILES
    assert (new / "Intermediate Files/pid_mapping.csv").read_bytes() == b"pid,poi\n9,90\n"
    assert new.name == server.head(DATASET_ID, "dataset") and old.name == old_sha


def test_hf_endpoint_env_var_and_offline_redownload_from_cache(server: HubServer, hf_home: Path) -> None:
    """A fresh process picks up HF_ENDPOINT/HF_HOME; a second one with HF_HUB_OFFLINE=1 is served by the cache."""
    old_sha = server.head(DATASET_ID, "dataset")
    requests = [
        [MODEL_ID, "model", "config.json", None],
        [DATASET_ID, "dataset", "Intermediate Files/pid_mapping.csv", None],
        [DATASET_ID, "dataset", "LLM Dataset/Intermediate Files/codebooks-x.csv", old_sha],
    ]
    expected = [
        _sha256(MODEL_FILES["config.json"]),
        _sha256(DATASET_FILES["Intermediate Files/pid_mapping.csv"]),
        _sha256(DATASET_FILES["LLM Dataset/Intermediate Files/codebooks-x.csv"]),
    ]
    env = {"HF_HOME": str(hf_home), "HF_ENDPOINT": server.url}
    online = _run_python(_CLIENT_SCRIPT, [json.dumps(requests)], env)
    assert online["endpoint"] == server.url and online["offline"] is False
    assert [digest for _, digest in online["files"]] == expected
    served = len(server.requests)
    assert served == 6  # HEAD + GET per file

    server.stop()  # nothing is listening any more: the offline run can only use the cache
    offline = _run_python(_CLIENT_SCRIPT, [json.dumps(requests)], {**env, "HF_HUB_OFFLINE": "1"})
    assert offline["offline"] is True
    assert offline["files"] == online["files"]
    assert len(server.requests) == served


def test_create_commit_two_files_in_one_commit(server: HubServer, api: HfApi, hf_home: Path, tmp_path: Path) -> None:
    assert api.create_repo(DATASET_ID, repo_type="dataset", exist_ok=True).repo_id == DATASET_ID
    new_repo = "test-org/results"
    assert api.create_repo(new_repo, repo_type="dataset", exist_ok=True).repo_id == new_repo
    assert server.files(new_repo, "dataset") == {}

    big_csv = tmp_path / "codebooks.csv"
    big_csv.write_text(
        "pid,c0,c1,c2\n" + "".join(f"{i},{i % 256},{(i * 7) % 256},{(i * 13) % 256}\n" for i in range(200_000))
    )
    assert big_csv.stat().st_size > 3_000_000
    small = b"pid,poi\n7,70\n"
    operations = [
        CommitOperationAdd("LLM Dataset/Intermediate Files/codebooks-x.csv", big_csv),
        CommitOperationAdd("Intermediate Files/pid_mapping.csv", small),
    ]
    info = api.create_commit(new_repo, repo_type="dataset", operations=operations, commit_message="Add results")

    assert server.commits == [
        {
            "repo_id": new_repo,
            "repo_type": "dataset",
            "message": "Add results",
            "description": "",
            "paths": ["LLM Dataset/Intermediate Files/codebooks-x.csv", "Intermediate Files/pid_mapping.csv"],
            "deleted": [],
            "parent": server.history(new_repo, "dataset")[0],
            "oid": info.oid,
        }
    ]
    stored = server.repo_dir(new_repo, "dataset")
    assert (stored / "LLM Dataset/Intermediate Files/codebooks-x.csv").read_bytes() == big_csv.read_bytes()
    assert (stored / "Intermediate Files/pid_mapping.csv").read_bytes() == small
    assert _statuses(server, "POST", "/preupload/main") == [200]
    assert _statuses(server, "POST", "/commit/main") == [200]
    assert ("POST", f"/api/datasets/{new_repo}/commit/main") in server.authenticated_requests
    assert not any("/lfs/" in path or "xet" in path for _, path, _ in server.requests)

    downloaded = hf_hub_download(
        new_repo,
        "LLM Dataset/Intermediate Files/codebooks-x.csv",
        repo_type="dataset",
        endpoint=server.url,
        cache_dir=hf_home / "hub",
    )
    assert Path(downloaded).read_bytes() == big_csv.read_bytes()

    # Re-committing identical content: the client drops unchanged files (preupload returns their oid).
    again = api.create_commit(
        new_repo,
        repo_type="dataset",
        operations=[CommitOperationAdd("Intermediate Files/pid_mapping.csv", small)],
        commit_message="No-op",
    )
    assert again.oid == info.oid and len(server.commits) == 1


# huggingface_hub's own LFS PUT passes a file object as `data=`, which httpx2 deprecates.
_IGNORE_CLIENT_DATA_WARNING = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@_IGNORE_CLIENT_DATA_WARNING
def test_lfs_upload_with_file_object(hub_root: Path, tmp_path: Path) -> None:
    """With ``lfs_threshold`` the preupload answer is "lfs"; a file object makes the client use HTTP LFS (not Xet)."""
    data = os.urandom(200_000)
    local = tmp_path / "poi_features.pt"
    local.write_bytes(data)
    with HubServer(hub_root, lfs_threshold=100_000) as server:
        api = HfApi(endpoint=server.url, token=SENTINEL_TOKEN)
        server.inject("POST", "/info/lfs/objects/batch", 503, times=1)
        with local.open("rb") as fileobj:
            info = api.create_commit(
                DATASET_ID,
                repo_type="dataset",
                operations=[CommitOperationAdd("RQVAE Dataset/poi_features.pt", fileobj)],
                commit_message="LFS upload",
            )
        assert _statuses(server, "POST", "/test-org/test-dataset.git/info/lfs/objects/batch") == [503, 200]
        assert _statuses(server, "PUT", "/_lfs/upload/") == [200]
        assert _statuses(server, "POST", "/_lfs/verify/") == [200]
        assert (server.repo_dir(DATASET_ID, "dataset") / "RQVAE Dataset/poi_features.pt").read_bytes() == data
        tree = {f.path: f for f in api.list_repo_tree(DATASET_ID, repo_type="dataset", recursive=True)}
        assert tree["RQVAE Dataset/poi_features.pt"].lfs.sha256 == _sha256(data)
        path = hf_hub_download(
            DATASET_ID,
            "RQVAE Dataset/poi_features.pt",
            repo_type="dataset",
            revision=info.oid,
            endpoint=server.url,
            cache_dir=tmp_path / "cache",
        )
        assert Path(path).read_bytes() == data
        assert Path(path).resolve().name == _sha256(data)  # LFS files are cached under their sha256 ETag


def test_lfs_upload_from_path_with_xet_disabled(hub_root: Path, hf_home: Path, tmp_path: Path) -> None:
    """With hf_xet installed, path-based LFS uploads need HF_HUB_DISABLE_XET=1 (read at import) to use HTTP LFS."""
    local = tmp_path / "features.bin"
    local.write_bytes(os.urandom(150_000))
    with HubServer(hub_root, lfs_threshold=100_000) as server:
        env = {
            "HF_HOME": str(hf_home),
            "HF_ENDPOINT": server.url,
            "HF_TOKEN": SENTINEL_TOKEN,
            "HF_HUB_DISABLE_XET": "1",
        }
        result = _run_python(_LFS_UPLOAD_SCRIPT, [DATASET_ID, str(local), "RQVAE Dataset/features.bin"], env)
        assert result["xet_disabled"] is True and result["oid"] == server.head(DATASET_ID, "dataset")
        assert _statuses(server, "PUT", "/_lfs/upload/") == [200]
        assert (
            server.repo_dir(DATASET_ID, "dataset") / "RQVAE Dataset/features.bin"
        ).read_bytes() == local.read_bytes()
        assert server.saw_token(SENTINEL_TOKEN)


def test_preupload_retried_by_client_on_503_and_429(server: HubServer, api: HfApi) -> None:
    server.inject("POST", "/preupload/", 503, times=1)
    server.inject("POST", "/preupload/", 429, times=1)  # carries Retry-After: 0 (client still sleeps 0 + 1 s)
    info = api.create_commit(
        DATASET_ID,
        repo_type="dataset",
        operations=[CommitOperationAdd("Intermediate Files/new.csv", b"a,b\n")],
        commit_message="After transient errors",
    )
    assert _statuses(server, "POST", "/api/datasets/test-org/test-dataset/preupload/main") == [503, 429, 200]
    assert server.pending_faults == 0
    assert [c["oid"] for c in server.commits] == [info.oid]


@pytest.mark.parametrize("status", [503, 429])
def test_commit_post_is_not_retried_by_client(server: HubServer, api: HfApi, status: int) -> None:
    """``create_commit`` posts the NDJSON commit once (``get_session().post``): errors reach the caller."""
    server.inject("POST", "/commit/", status, times=1)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            DATASET_ID,
            repo_type="dataset",
            operations=[CommitOperationAdd("Intermediate Files/new.csv", b"a,b\n")],
            commit_message="First try",
        )
    assert excinfo.value.response.status_code == status
    assert _statuses(server, "POST", "/commit/main") == [status]
    assert server.commits == []

    # A caller-side retry (fresh operations) succeeds.
    api.create_commit(
        DATASET_ID,
        repo_type="dataset",
        operations=[CommitOperationAdd("Intermediate Files/new.csv", b"a,b\n")],
        commit_message="Second try",
    )
    assert _statuses(server, "POST", "/commit/main") == [status, 200]
    assert [c["message"] for c in server.commits] == ["Second try"]


@pytest.mark.skipif(
    importlib.util.find_spec("hf_xet") is None or constants.HF_HUB_DISABLE_XET,
    reason="upload_folder only takes the pipelined (commit-retrying) path when hf_xet is usable",
)
def test_upload_folder_commit_post_is_retried_by_client(server: HubServer, api: HfApi, tmp_path: Path) -> None:
    folder = tmp_path / "to_upload"
    _write_files(folder, {"Intermediate Files/new.csv": b"a,b\n", "notes.txt": b"n\n"})
    server.inject("POST", "/commit/", 503, times=1)
    api.upload_folder(repo_id=DATASET_ID, repo_type="dataset", folder_path=folder, commit_message="Folder")
    assert _statuses(server, "POST", "/commit/main") == [503, 200]
    assert [sorted(c["paths"]) for c in server.commits] == [["Intermediate Files/new.csv", "notes.txt"]]


def test_download_retry_behaviour(server: HubServer, hf_home: Path) -> None:
    cache = hf_home / "hub"
    # HEAD: first attempt is not retried, but with no cached copy the client makes a second, retrying pass.
    server.inject("HEAD", "/resolve/main/config.json", 503, times=1)
    path = hf_hub_download(MODEL_ID, "config.json", endpoint=server.url, cache_dir=cache)
    assert Path(path).read_bytes() == MODEL_FILES["config.json"]
    assert _statuses(server, "HEAD", "/resolve/main/config.json") == [503, 200]

    # GET: retried on 429 ...
    server.inject("GET", "/resolve/main/Intermediate Files/pid_mapping.csv", 429, times=1)
    path = hf_hub_download(
        DATASET_ID, "Intermediate Files/pid_mapping.csv", repo_type="dataset", endpoint=server.url, cache_dir=cache
    )
    assert Path(path).read_bytes() == DATASET_FILES["Intermediate Files/pid_mapping.csv"]
    assert _statuses(server, "GET", "/resolve/main/Intermediate Files/pid_mapping.csv") == [429, 200]

    # ... but not on 5xx.
    server.inject("GET", "/resolve/main/checkpoints/rqvae.pt", 503, times=1)
    with pytest.raises(HfHubHTTPError) as excinfo:
        hf_hub_download(MODEL_ID, "checkpoints/rqvae.pt", endpoint=server.url, cache_dir=cache)
    assert excinfo.value.response.status_code == 503
    assert _statuses(server, "GET", "/resolve/main/checkpoints/rqvae.pt") == [503]


def test_injected_403_raises_hf_hub_http_error(server: HubServer, api: HfApi) -> None:
    body = json.dumps({"error": "You don't have the rights to create a commit here"}).encode()
    server.inject("POST", "/preupload/", 403, times=1, headers={"X-Error-Message": "Forbidden by test"}, body=body)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(
            DATASET_ID,
            repo_type="dataset",
            operations=[CommitOperationAdd("a.csv", b"1\n")],
            commit_message="Denied",
        )
    assert excinfo.value.response.status_code == 403
    assert "Forbidden by test" in str(excinfo.value)
    assert _statuses(server, "POST", "/preupload/") == [403]  # 403 is not retried
    assert server.commits == []


def test_missing_or_wrong_token_gets_401(hub_root: Path, hf_home: Path) -> None:
    with HubServer(hub_root, token=SENTINEL_TOKEN) as server:
        anonymous = HfApi(endpoint=server.url, token=False)
        for client in (anonymous, HfApi(endpoint=server.url, token="hf_wrong")):
            with pytest.raises(HfHubHTTPError) as excinfo:
                client.create_commit(
                    DATASET_ID,
                    repo_type="dataset",
                    operations=[CommitOperationAdd("a.csv", b"1\n")],
                    commit_message="Unauthenticated",
                )
            assert excinfo.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError) as excinfo:
            anonymous.create_repo("test-org/other", repo_type="dataset")
        assert excinfo.value.response.status_code == 401
        assert server.commits == []

        # Reads stay public.
        assert anonymous.model_info(MODEL_ID).sha == server.head(MODEL_ID)
        path = hf_hub_download(MODEL_ID, "config.json", token=False, endpoint=server.url, cache_dir=hf_home / "hub")
        assert Path(path).read_bytes() == MODEL_FILES["config.json"]
        assert not server.saw_token(SENTINEL_TOKEN)


def test_sentinel_token_never_written(
    server: HubServer, api: HfApi, hf_home: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cache = hf_home / "hub"
    hf_hub_download(MODEL_ID, "config.json", token=SENTINEL_TOKEN, endpoint=server.url, cache_dir=cache)
    api.create_repo("test-org/new", repo_type="dataset", exist_ok=True)
    api.create_commit(
        "test-org/new",
        repo_type="dataset",
        operations=[CommitOperationAdd("Intermediate Files/x.csv", b"x\n"), CommitOperationAdd("y.txt", b"y\n")],
        commit_message="With token",
    )
    hf_hub_download(
        "test-org/new", "y.txt", repo_type="dataset", token=SENTINEL_TOKEN, endpoint=server.url, cache_dir=cache
    )
    assert server.token_presented and server.saw_token(SENTINEL_TOKEN)

    sentinel = SENTINEL_TOKEN.encode()
    checked = 0
    for path in tmp_path.rglob("*"):  # hub root (incl. .objects), HF_HOME/cache
        if path.is_file() and not path.is_symlink():
            assert sentinel not in path.read_bytes(), f"token leaked into {path}"
            checked += 1
    assert checked > 5
    out, err = capfd.readouterr()
    assert SENTINEL_TOKEN not in out + err
    assert SENTINEL_TOKEN not in repr(server.requests) + repr(server.authenticated_requests) + repr(server.commits)
