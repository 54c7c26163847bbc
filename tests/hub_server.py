"""Local stand-in for the part of the Hugging Face Hub HTTP API that ``huggingface_hub`` (2.4.0) uses.

The server lets tests drive the *real* ``huggingface_hub`` client against a directory on disk, without
monkeypatching the client and without network access (it binds to ``127.0.0.1`` only).

Storage model
-------------
The server is built on a root directory laid out like the project's local hub::

    <root>/models/<org>/<name>/<files...>
    <root>/datasets/<org>/<dataset>/<files...>

File paths may contain spaces and sub-folders (``"RQVAE Dataset/poi_features.pt"``). Top-level ``.git`` and
``.cache`` folders inside a repo are ignored. On :meth:`HubServer.start`, the current content of every repo
folder becomes that repo's initial commit. Every file version ever served is kept, content-addressed by sha256,
under ``<root>/.objects/<sha256>`` (or ``objects_dir``), so old revisions stay downloadable after a commit
overwrote the file on disk. Each repo has a linear history on the single branch ``main``; commit ids are
deterministic 40-hex sha1 digests of (repo, parent, message, sorted ``(path, sha256)`` pairs). A commit writes
the new files into the repo folder (so tests can compare stored bytes with a local run) and records itself in
:attr:`HubServer.commits`.

Pointing the client at the server
---------------------------------
``huggingface_hub`` reads ``HF_ENDPOINT`` (and ``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``) once,
at import time, into ``huggingface_hub.constants``. Setting the env var in a process that already imported
the library has no effect. Either:

* pass the endpoint explicitly: ``HfApi(endpoint=server.url)`` and
  ``hf_hub_download(..., endpoint=server.url, cache_dir=...)`` (both supported in 2.4.0), or
* set ``HF_ENDPOINT=server.url`` (and ``HF_HOME``) in the environment of a *fresh* process (subprocess).

Endpoints
---------
* ``HEAD``/``GET`` ``/[datasets/]{org}/{name}/resolve/{revision}/{path}``: file download. Answers ``200``
  directly (no CDN redirect) with ``X-Repo-Commit``, ``ETag`` (git blob sha1, or sha256 for LFS files),
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length`` and single ``Range`` support. No
  ``X-Xet-Hash`` header is ever sent, so the client downloads over plain HTTP even with ``hf_xet`` installed.
* ``GET /api/{models|datasets}/{org}/{name}[/revision/{revision}]``: repo info (``sha``, ``siblings``;
  sizes/blob ids/LFS info with ``?blobs=true``).
* ``GET /api/{models|datasets}/{org}/{name}/tree/{revision}[/{path}]``: tree listing (``list_repo_files``,
  ``list_repo_tree``), single page; ``POST .../paths-info/{revision}``.
* ``POST /api/{models|datasets}/{org}/{name}/preupload/{revision}``: answers ``"regular"`` for every file
  (content is then sent inline, base64, in the NDJSON commit) unless ``lfs_threshold`` is set, in which case
  files of at least that many bytes get ``"lfs"``.
* ``POST /api/{models|datasets}/{org}/{name}/commit/{revision}``: NDJSON commit (``header``, ``file``,
  ``lfsFile``, ``deletedFile``, ``deletedFolder``); only branch ``main``; ``parentCommit`` is checked (412).
* ``POST /[datasets/]{org}/{name}.git/info/lfs/objects/batch`` + ``PUT /_lfs/upload/{ticket}`` +
  ``POST /_lfs/verify/{oid}``: the legacy (non-Xet) LFS upload protocol, basic single-part transfer.
* ``POST /api/repos/create`` (``create_repo``; 409 if the repo exists, which ``exist_ok=True`` accepts) and
  ``GET /api/whoami-v2``.
* ``GET /api/{models|datasets}/{org}/{name}/auth-check[/write]`` (``auth_check``): ``200`` when the repo exists (and,
  for ``/write``, the request carries an accepted token), ``404 RepoNotFound`` otherwise.
* ``/api/.../xet-read-token/...`` and ``xet-write-token``: ``501``. Note: when the preupload answer is
  ``"lfs"`` and ``hf_xet`` is installed, the client uploads through Xet for path/bytes operations, which this
  server does not support. To exercise the LFS path either pass an open binary file object as
  ``path_or_fileobj`` (the client then falls back to HTTP LFS) or set ``HF_HUB_DISABLE_XET=1`` before import.

Errors use the headers the client maps to exceptions: ``X-Error-Code: RepoNotFound`` (404),
``RevisionNotFound`` (404), ``EntryNotFound`` (404, with ``X-Repo-Commit``), plus ``X-Error-Message``.

Auth
----
Reads are public. Writes (preupload, commit, LFS batch/verify, create_repo, whoami, auth-check/write) require
``Authorization: Bearer <token>`` and answer ``401`` otherwise; if the server was built with ``token=...``,
any other token is rejected with ``401`` too. Token values are never stored, logged or written: the server
keeps only sha256 digests in memory (see :meth:`HubServer.saw_token`). Default ``http.server`` request logging
is silenced.

Fault injection and request log
-------------------------------
:meth:`HubServer.inject` makes the next ``times`` requests whose method matches and whose path contains a
substring answer a given status (``429`` carries ``Retry-After: 0`` by default). :attr:`HubServer.requests`
lists ``(method, unquoted path without query, status)`` for every request served.

Example::

    with HubServer(tmp_path / "hub") as server:
        api = HfApi(endpoint=server.url, token="hf_test")
        path = hf_hub_download("org/model", "config.json", endpoint=server.url, cache_dir=tmp_path / "cache")
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer"]

DEFAULT_BRANCH = "main"
OBJECTS_DIRNAME = ".objects"
STAND_IN_USER = "hub-stand-in-user"

_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset"}
_TYPE_TO_DIR = {"model": "models", "dataset": "datasets"}
_URL_PREFIX = {"model": "", "dataset": "datasets/"}
_COMMIT_SHA_RE = re.compile(r"[0-9a-f]{40}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_SKIPPED_REPO_DIRS = frozenset({".git", ".cache"})
_CHUNK_SIZE = 1 << 20
_JSON = "application/json"
_LFS_JSON = "application/vnd.git-lfs+json"


def _git_blob_sha1(data: bytes) -> str:
    """Git blob id of ``data`` (what ``git hash-object`` prints)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the git-lfs pointer file for an object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    """Current UTC time in the format the Hub uses (parsed by ``huggingface_hub.utils.parse_datetime``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _digest(token: str) -> str:
    """One-way digest of a token: the only form in which a token is ever kept."""
    return hashlib.sha256(token.encode()).hexdigest()


def _header_safe(text: str) -> str:
    """Make ``text`` usable as an HTTP header value (ASCII, single line)."""
    return text.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace("\n", " ")


def _validate_repo_path(path: str) -> str:
    """Validate a file path inside a repo (relative, ``/``-separated, no ``.``/``..`` parts)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts):
        raise _HttpError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class _FileEntry:
    """One file version: content hashes, size and storage kind (regular git blob or LFS)."""

    sha256: str
    size: int
    git_sha1: str
    lfs: bool

    @property
    def pointer(self) -> bytes:
        return _lfs_pointer(self.sha256, self.size)

    @property
    def blob_id(self) -> str:
        """Git blob id as the Hub reports it (the pointer's id for LFS files)."""
        return _git_blob_sha1(self.pointer) if self.lfs else self.git_sha1

    @property
    def etag(self) -> str:
        """ETag of ``/resolve`` answers: git blob sha1, or sha256 for LFS files (like the Hub)."""
        return self.sha256 if self.lfs else self.git_sha1

    def tree_json(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "path": path, "size": self.size, "oid": self.blob_id}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    oid: str
    parent: str | None
    message: str
    description: str
    date: str
    tree: dict[str, _FileEntry]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    directory: Path
    history: list[_Commit] = field(default_factory=list)

    @property
    def head(self) -> _Commit:
        return self.history[-1]

    @property
    def url_path(self) -> str:
        return f"{_URL_PREFIX[self.repo_type]}{self.repo_id}"


@dataclass
class _Response:
    """A response to send: either ``body`` bytes or a byte range of a stored object file."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    start: int = 0
    end: int = 0  # exclusive


@dataclass
class _Fault:
    method: str
    path_substring: str
    status: int
    remaining: int
    headers: dict[str, str]
    body: bytes | None


class _HttpError(Exception):
    """Raised by route handlers; turned into an error response with Hub-style error headers."""

    def __init__(
        self, status: int, message: str, *, error_code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}

    def response(self) -> _Response:
        return _error_response(self.status, self.message, error_code=self.error_code, headers=self.headers)


def _error_response(
    status: int, message: str, *, error_code: str | None = None, headers: dict[str, str] | None = None
) -> _Response:
    all_headers = {"Content-Type": _JSON, "X-Error-Message": _header_safe(message), **(headers or {})}
    if error_code is not None:
        all_headers["X-Error-Code"] = error_code
    return _Response(status, all_headers, json.dumps({"error": message}).encode())


def _json_response(payload: Any, *, status: int = 200, content_type: str = _JSON) -> _Response:
    return _Response(status, {"Content-Type": content_type}, json.dumps(payload).encode())


def _parse_json_body(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as err:
        raise _HttpError(400, f"Malformed JSON body: {err}") from err


def _bearer_token(authorization: str | None) -> str | None:
    """Extract the token of an ``Authorization: Bearer <token>`` header (``None`` if absent or empty)."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP adapter: reads the request, delegates to :class:`HubServer`, writes the response."""

    server_version = "HubStandIn/1.0"
    protocol_version = "HTTP/1.0"  # one request per connection: no stale keep-alive sockets between tests
    timeout = 60

    def log_message(self, *args: Any) -> None:
        """Silence ``http.server``'s default per-request logging to stderr."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self, method: str) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        split = urlsplit(self.path)
        try:
            # Always consume the whole body before answering, even for errors/faults.
            body = self._read_body()
        except (ValueError, OSError):
            response = _error_response(400, "Malformed request body")
            hub._record(method, unquote(split.path), response.status)
        else:
            token = _bearer_token(self.headers.get("Authorization"))
            response = hub._handle_request(method, split.path, split.query, body, token, self.headers.get("Range"))
        self._send(method, response)

    def _send(self, method: str, response: _Response) -> None:
        length = response.end - response.start if response.file is not None else len(response.body)
        try:
            self.send_response(response.status)
            for key, value in response.headers.items():
                self.send_header(key, value)
            if "Content-Length" not in response.headers:
                self.send_header("Content-Length", str(length))
            self.end_headers()
            if method == "HEAD":
                return
            if response.file is None:
                self.wfile.write(response.body)
                return
            with response.file.open("rb") as file:
                file.seek(response.start)
                remaining = length
                while remaining > 0:
                    chunk = file.read(min(_CHUNK_SIZE, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # client went away (e.g. closed after reading the headers)


class HubServer:
    """In-process stand-in for the Hugging Face Hub, serving repos stored under ``root``.

    Args:
        root: Directory laid out as ``models/<org>/<name>/...`` and ``datasets/<org>/<name>/...``.
            Created if missing. Content-addressed file versions are kept under ``root/.objects``.
        token: If given, write endpoints accept only this bearer token (others get ``401``). Only its
            sha256 digest is kept in memory.
        lfs_threshold: If given, the preupload endpoint asks the client to upload files of at least this
            many bytes through LFS (and files found on disk at start are classified the same way).
            Default ``None``: every file is a regular file sent inline in the commit payload.
        objects_dir: Where content-addressed file versions are kept (default ``root/.objects``); pass a
            folder outside ``root`` to keep ``root`` byte-comparable with a local hub.

    Public attributes:
        url: ``"http://127.0.0.1:<port>"`` once started (``None`` before).
        commits: One dict per commit created through the API, in order, with keys ``repo_id``,
            ``repo_type``, ``message``, ``description``, ``paths`` (added/updated paths), ``deleted``,
            ``parent`` and ``oid``.
        requests: ``(method, path, status)`` for every request served; ``path`` is URL-unquoted and
            has no query string (e.g. ``"/datasets/org/ds/resolve/main/Intermediate Files/a.csv"``).
        authenticated_requests: ``(method, path)`` of every request that carried a bearer token.
    """

    def __init__(
        self,
        root: Path,
        *,
        token: str | None = None,
        lfs_threshold: int | None = None,
        objects_dir: Path | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.objects_dir = Path(objects_dir).resolve() if objects_dir is not None else self.root / OBJECTS_DIRNAME
        self.lfs_threshold = lfs_threshold
        self.url: str | None = None
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str, int]] = []
        self.authenticated_requests: list[tuple[str, str]] = []
        self._required_token_digest = _digest(token) if token else None
        self._token_digests: set[str] = set()
        self._faults: list[_Fault] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._upload_tickets: dict[str, tuple[str, int]] = {}
        self._lock = threading.RLock()
        self._loaded = False
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Snapshot the repos on disk (first start only), bind ``127.0.0.1:0`` and serve in a daemon thread.

        Returns:
            The endpoint URL, e.g. ``"http://127.0.0.1:54321"``.
        """
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        with self._lock:
            if not self._loaded:
                self.root.mkdir(parents=True, exist_ok=True)
                self.rescan()
                self._loaded = True
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-stand-in", daemon=True
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving and release the port. Repo state is kept (a later :meth:`start` serves it again)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def endpoint(self) -> str | None:
        """Alias of :attr:`url`."""
        return self.url

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers

    def inject(
        self,
        method: str,
        path_substring: str,
        status: int,
        times: int = 1,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> None:
        """Make the next ``times`` matching requests answer ``status`` without being processed.

        A request matches when its method equals ``method`` (case-insensitive; ``"*"`` matches any) and
        ``path_substring`` occurs in its path (raw or URL-unquoted, query string excluded). Faults are
        consumed in injection order. Defaults: ``X-Error-Message`` and a JSON ``{"error": ...}`` body;
        ``Retry-After: 0`` for ``429``. ``headers``/``body`` override or extend those defaults.
        """
        if times < 1:
            raise ValueError("times must be >= 1")
        default_headers = {"Retry-After": "0"} if status == 429 else {}
        with self._lock:
            self._faults.append(
                _Fault(method.upper(), path_substring, status, times, {**default_headers, **(headers or {})}, body)
            )

    def clear_faults(self) -> None:
        """Drop all pending injected faults."""
        with self._lock:
            self._faults.clear()

    @property
    def pending_faults(self) -> int:
        """Number of injected fault answers not consumed yet."""
        with self._lock:
            return sum(f.remaining for f in self._faults)

    @property
    def token_presented(self) -> bool:
        """Whether any request carried a bearer token."""
        with self._lock:
            return bool(self._token_digests)

    def saw_token(self, token: str) -> bool:
        """Whether ``token`` was presented by some request (compared by digest; the value is never stored)."""
        with self._lock:
            return _digest(token) in self._token_digests

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        """Commit id of ``main`` for a repo."""
        with self._lock:
            return self._get_repo(repo_type, repo_id).head.oid

    def history(self, repo_id: str, repo_type: str = "model") -> list[str]:
        """Commit ids of a repo, oldest first."""
        with self._lock:
            return [c.oid for c in self._get_repo(repo_type, repo_id).history]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = DEFAULT_BRANCH) -> dict[str, str]:
        """``{path: sha256}`` of a repo at a revision."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return {p: e.sha256 for p, e in self._resolve_revision(repo, revision).tree.items()}

    def repo_dir(self, repo_id: str, repo_type: str = "model") -> Path:
        """Folder holding a repo's current files."""
        return self.root / _TYPE_TO_DIR[repo_type] / repo_id

    def rescan(self, message: str = "Sync files from disk") -> list[str]:
        """Pick up repos/files changed on disk outside the API.

        New repo folders get an initial commit; repos whose files differ from ``main`` get a new commit
        with ``message`` (not added to :attr:`commits`, which lists API commits only). Called by
        :meth:`start` the first time. Returns the new commit ids.
        """
        new_oids = []
        with self._lock:
            for repo_type, dirname in _TYPE_TO_DIR.items():
                type_dir = self.root / dirname
                if not type_dir.is_dir():
                    continue
                for org_dir in sorted(p for p in type_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    for repo_path in sorted(p for p in org_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                        repo_id = f"{org_dir.name}/{repo_path.name}"
                        tree = self._scan_tree(repo_path)
                        repo = self._repos.get((repo_type, repo_id))
                        if repo is None:
                            repo = _Repo(repo_type, repo_id, repo_path)
                            self._repos[(repo_type, repo_id)] = repo
                            commit = self._make_commit(repo, tree, "Initial commit", "")
                        elif {p: e.sha256 for p, e in tree.items()} != {p: e.sha256 for p, e in repo.head.tree.items()}:
                            commit = self._make_commit(repo, tree, message, "")
                        else:
                            continue
                        repo.history.append(commit)
                        new_oids.append(commit.oid)
        return new_oids

    # ------------------------------------------------------------------ storage

    def _scan_tree(self, repo_path: Path) -> dict[str, _FileEntry]:
        tree: dict[str, _FileEntry] = {}
        for dirpath, dirnames, filenames in os.walk(repo_path):
            if Path(dirpath) == repo_path:
                dirnames[:] = [d for d in dirnames if d not in _SKIPPED_REPO_DIRS]
            dirnames.sort()
            for name in sorted(filenames):
                file_path = Path(dirpath) / name
                if file_path.is_file():
                    rel = file_path.relative_to(repo_path).as_posix()
                    tree[rel] = self._store_file(file_path)
        return tree

    def _is_lfs_size(self, size: int) -> bool:
        return self.lfs_threshold is not None and size > 0 and size >= self.lfs_threshold

    def _store_file(self, path: Path) -> _FileEntry:
        """Copy a file into the object store (if new) and return its entry."""
        size = path.stat().st_size
        sha256 = hashlib.sha256()
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        self.objects_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.objects_dir / f".tmp-{secrets.token_hex(8)}"
        with path.open("rb") as src, tmp.open("wb") as dst:
            while chunk := src.read(_CHUNK_SIZE):
                sha256.update(chunk)
                sha1.update(chunk)
                dst.write(chunk)
        digest = sha256.hexdigest()
        target = self.objects_dir / digest
        if target.exists():
            tmp.unlink()
        else:
            os.replace(tmp, target)
        return _FileEntry(digest, size, sha1.hexdigest(), self._is_lfs_size(size))

    def _store_bytes(self, data: bytes) -> str:
        """Put ``data`` in the object store; return its sha256."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.objects_dir / digest
        if not target.exists():
            self.objects_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.objects_dir / f".tmp-{secrets.token_hex(8)}"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return digest

    def _object_path(self, sha256: str) -> Path:
        return self.objects_dir / sha256

    def _make_commit(self, repo: _Repo, tree: dict[str, _FileEntry], message: str, description: str) -> _Commit:
        parent = repo.head.oid if repo.history else None
        h = hashlib.sha1()
        for part in (repo.repo_type, repo.repo_id, parent or "", message, description):
            h.update(part.encode() + b"\0")
        for path in sorted(tree):
            h.update(f"{path}\0{tree[path].sha256}\n".encode())
        return _Commit(h.hexdigest(), parent, message, description, _now(), dict(tree))

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository not found: {repo_type} {repo_id}", error_code="RepoNotFound")
        return repo

    def _resolve_revision(self, repo: _Repo, revision: str) -> _Commit:
        if revision in (DEFAULT_BRANCH, f"refs/heads/{DEFAULT_BRANCH}"):
            return repo.head
        if _COMMIT_SHA_RE.fullmatch(revision):
            for commit in repo.history:
                if commit.oid == revision:
                    return commit
        raise _HttpError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")

    # ------------------------------------------------------------------ request handling

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def _take_fault(self, method: str, raw_path: str, path: str) -> _Response | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining <= 0 or fault.method not in ("*", method):
                    continue
                if fault.path_substring in path or fault.path_substring in raw_path:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    message = f"Injected fault: HTTP {fault.status}"
                    response = _error_response(fault.status, message, headers=fault.headers)
                    if fault.body is not None:
                        response.body = fault.body
                    return response
        return None

    def _handle_request(
        self, method: str, raw_path: str, query: str, body: bytes, token: str | None, range_header: str | None
    ) -> _Response:
        path = unquote(raw_path)
        if token is not None:
            with self._lock:
                self._token_digests.add(_digest(token))
                self.authenticated_requests.append((method, path))
        response = self._take_fault(method, raw_path, path)
        if response is None:
            try:
                response = self._route(method, raw_path, parse_qs(query), body, token, range_header)
            except _HttpError as err:
                response = err.response()
            except Exception as err:  # noqa: BLE001 - report server bugs as HTTP 500 instead of dropping the socket
                response = _error_response(500, f"Hub stand-in internal error: {type(err).__name__}: {err}")
        self._record(method, path, response.status)
        return response

    def _require_auth(self, token: str | None) -> None:
        if token is None:
            raise _HttpError(401, "Authorization header is required for this endpoint (Bearer token)")
        if self._required_token_digest is not None and _digest(token) != self._required_token_digest:
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _route(
        self,
        method: str,
        raw_path: str,
        query: dict[str, list[str]],
        body: bytes,
        token: str | None,
        range_header: str | None,
    ) -> _Response:
        segs = [unquote(s) for s in raw_path.strip("/").split("/")]
        if method == "HEAD" and "resolve" not in segs[:4]:
            method = "GET"  # HEAD on non-file routes: same headers as GET, no body
        if segs[0] == "api":
            return self._route_api(method, segs[1:], query, body, token)
        if segs[0] == "_lfs" and len(segs) == 3:
            if method == "PUT" and segs[1] == "upload":
                return self._lfs_upload(segs[2], body)
            if method == "POST" and segs[1] == "verify":
                self._require_auth(token)
                return self._lfs_verify(segs[2], body)
        repo_type = "dataset" if segs[0] == "datasets" else "model"
        rest = segs[1:] if repo_type == "dataset" else segs
        if len(rest) >= 5 and rest[2] == "resolve" and method in ("GET", "HEAD"):
            with self._lock:
                repo = self._get_repo(repo_type, f"{rest[0]}/{rest[1]}")
                commit = self._resolve_revision(repo, rest[3])
            return self._resolve_file(commit, "/".join(rest[4:]), range_header)
        is_lfs_batch = len(rest) == 6 and rest[1].endswith(".git") and rest[2:] == ["info", "lfs", "objects", "batch"]
        if is_lfs_batch and method == "POST":
            self._require_auth(token)
            with self._lock:
                self._get_repo(repo_type, f"{rest[0]}/{rest[1][: -len('.git')]}")
            return self._lfs_batch(body)
        raise _HttpError(404, f"Not implemented by the hub stand-in: {method} {unquote(raw_path)}")

    def _route_api(
        self, method: str, segs: list[str], query: dict[str, list[str]], body: bytes, token: str | None
    ) -> _Response:
        if segs == ["whoami-v2"] and method == "GET":
            self._require_auth(token)
            return _json_response(
                {
                    "type": "user",
                    "name": STAND_IN_USER,
                    "fullname": "Hub stand-in user",
                    "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in", "role": "write"}},
                }
            )
        if segs == ["repos", "create"] and method == "POST":
            self._require_auth(token)
            return self._create_repo(_parse_json_body(body))
        if len(segs) < 3 or segs[0] not in ("models", "datasets", "spaces", "kernels"):
            raise _HttpError(404, f"Not implemented by the hub stand-in: {method} /api/{'/'.join(segs)}")
        repo_type = _PLURAL_TO_TYPE.get(segs[0])
        if repo_type is None:
            raise _HttpError(404, f"Repo type not supported by the stand-in: {segs[0]}", error_code="RepoNotFound")
        repo_id = f"{segs[1]}/{segs[2]}"
        action, args = (segs[3], segs[4:]) if len(segs) > 3 else ("", [])
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")

        if action.startswith("xet-") and action.endswith("-token"):
            raise _HttpError(
                501,
                "Xet storage is not supported by the hub stand-in (set HF_HUB_DISABLE_XET=1 or upload a file object)",
            )
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            if action == "" and method == "GET":
                return _json_response(self._repo_info_json(repo, repo.head, blobs))
            if action == "revision" and args and method == "GET":
                return _json_response(self._repo_info_json(repo, self._resolve_revision(repo, args[0]), blobs))
            if action == "auth-check" and args in ([], ["write"]) and method == "GET":
                if args:  # write access: any accepted token may write to any repo
                    self._require_auth(token)
                return _json_response({})
            if action == "tree" and args and method == "GET":
                commit = self._resolve_revision(repo, args[0])
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return _json_response(self._tree_json(commit, "/".join(args[1:]), recursive))
            if action == "paths-info" and len(args) == 1 and method == "POST":
                commit = self._resolve_revision(repo, args[0])
                return _json_response(self._paths_info_json(commit, parse_qs(body.decode())))
            if action == "preupload" and len(args) == 1 and method == "POST":
                self._require_auth(token)
                return self._preupload(repo, args[0], _parse_json_body(body))
            if action == "commit" and len(args) == 1 and method == "POST":
                self._require_auth(token)
                if query.get("create_pr", ["0"])[0] not in ("0", "false", ""):
                    raise _HttpError(400, "create_pr is not supported by the hub stand-in")
                return self._commit(repo, args[0], body)
        raise _HttpError(404, f"Not implemented by the hub stand-in: {method} /api/{'/'.join(segs)}")

    # ------------------------------------------------------------------ read endpoints

    def _resolve_file(self, commit: _Commit, filename: str, range_header: str | None) -> _Response:
        entry = commit.tree.get(filename)
        if entry is None:
            raise _HttpError(
                404, f"Entry not found: {filename}", error_code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.etag}"',
            "X-Repo-Commit": commit.oid,
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, entry.size, 200
        match = _RANGE_RE.fullmatch((range_header or "").strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)) + 1, entry.size) if match.group(2) else entry.size
            else:  # suffix range: last N bytes
                start = max(entry.size - int(match.group(2)), 0)
            if start >= entry.size or start >= end:
                return _error_response(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{entry.size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        return _Response(status, headers, file=self._object_path(entry.sha256), start=start, end=end)

    def _repo_info_json(self, repo: _Repo, commit: _Commit, blobs: bool) -> dict[str, Any]:
        siblings = []
        for path in sorted(commit.tree):
            entry = commit.tree[path]
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": len(entry.pointer)}
            siblings.append(sibling)
        return {
            "_id": repo.history[0].oid[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.history[0].date,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }

    @staticmethod
    def _folder_json(commit: _Commit, path: str) -> dict[str, Any]:
        return {"type": "directory", "path": path, "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()}

    def _tree_json(self, commit: _Commit, path_in_repo: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = path_in_repo.strip("/")
        if prefix in commit.tree:
            raise _HttpError(404, f"{prefix} is a file, not a folder", error_code="EntryNotFound")
        base = f"{prefix}/" if prefix else ""
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(commit.tree):
            if not path.startswith(base):
                continue
            parts = path[len(base) :].split("/")
            depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
            for i in range(1, depth + 1):
                folder = base + "/".join(parts[:i])
                entries.setdefault(folder, self._folder_json(commit, folder))
            if recursive or len(parts) == 1:
                entries[path] = commit.tree[path].tree_json(path)
        if prefix and not entries:
            raise _HttpError(404, f"Folder not found: {prefix}", error_code="EntryNotFound")
        return list(entries.values())

    def _paths_info_json(self, commit: _Commit, form: dict[str, list[str]]) -> list[dict[str, Any]]:
        result = []
        for raw_path in form.get("paths", []):
            path = raw_path.strip("/")
            if path in commit.tree:
                result.append(commit.tree[path].tree_json(path))
            elif any(p.startswith(f"{path}/") for p in commit.tree):
                result.append(self._folder_json(commit, path))
        return result

    # ------------------------------------------------------------------ write endpoints

    def _create_repo(self, payload: Any) -> _Response:
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            raise _HttpError(400, "Missing repo name")
        repo_type = payload.get("type") or "model"
        if repo_type not in _TYPE_TO_DIR:
            raise _HttpError(400, f"Repo type not supported by the hub stand-in: {repo_type}")
        org = payload.get("organization") or STAND_IN_USER
        name = payload["name"]
        if not (_NAME_RE.fullmatch(org) and _NAME_RE.fullmatch(name)) or ".." in org + name:
            raise _HttpError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        with self._lock:
            existing = self._repos.get((repo_type, repo_id))
            if existing is not None:
                # Like the Hub: the 409 body carries the repo url, which `create_repo(exist_ok=True)` returns.
                message = f"You already created this {repo_type} repo"
                response = _error_response(409, message)
                response.body = json.dumps({"error": message, "url": f"{self.url}/{existing.url_path}"}).encode()
                return response
            directory = self.repo_dir(repo_id, repo_type)
            directory.mkdir(parents=True, exist_ok=True)
            repo = _Repo(repo_type, repo_id, directory)
            repo.history.append(self._make_commit(repo, self._scan_tree(directory), "Initial commit", ""))
            self._repos[(repo_type, repo_id)] = repo
        return _json_response({"url": f"{self.url}/{repo.url_path}", "name": repo_id, "id": repo.history[0].oid[:24]})

    def _preupload(self, repo: _Repo, revision: str, payload: Any) -> _Response:
        commit = self._resolve_revision(repo, revision)
        if not isinstance(payload, dict) or not isinstance(payload.get("files"), list):
            raise _HttpError(400, "Malformed preupload payload: expected {'files': [...]}")
        files = []
        for item in payload["files"]:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise _HttpError(400, "Malformed preupload payload: each file needs a 'path'")
            path = _validate_repo_path(item["path"])
            mode = "lfs" if self._is_lfs_size(int(item.get("size") or 0)) else "regular"
            existing = commit.tree.get(path)
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_sha1)
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json_response({"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, body: bytes) -> _Response:
        payload = _parse_json_body(body)
        if not isinstance(payload, dict) or payload.get("operation") != "upload":
            raise _HttpError(400, "The hub stand-in only supports LFS batch 'upload' operations")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = str(obj.get("oid", "")).lower(), obj.get("size")
            if not _SHA256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": oid,
                        "size": size if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid object"},
                    }
                )
                continue
            stored = self._object_path(oid)
            if stored.exists() and stored.stat().st_size == size:
                objects.append({"oid": oid, "size": size})  # no "actions": already present upstream
                continue
            ticket = secrets.token_urlsafe(16)
            with self._lock:
                self._upload_tickets[ticket] = (oid, size)
            actions = {
                "upload": {"href": f"{self.url}/_lfs/upload/{ticket}"},
                "verify": {"href": f"{self.url}/_lfs/verify/{oid}"},
            }
            objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
        return _json_response({"transfer": "basic", "objects": objects}, content_type=_LFS_JSON)

    def _lfs_upload(self, ticket: str, body: bytes) -> _Response:
        with self._lock:
            expected = self._upload_tickets.get(ticket)
        if expected is None:
            raise _HttpError(403, "Unknown or expired LFS upload URL")
        oid, size = expected
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, f"Uploaded content does not match LFS object {oid} ({size} bytes)")
        self._store_bytes(body)
        return _Response(200)

    def _lfs_verify(self, oid: str, body: bytes) -> _Response:
        payload = _parse_json_body(body)
        stored = self._object_path(oid.lower())
        if not _SHA256_RE.fullmatch(oid.lower()) or not stored.exists():
            raise _HttpError(404, f"LFS object not found: {oid}")
        if isinstance(payload, dict) and payload.get("size") not in (None, stored.stat().st_size):
            raise _HttpError(422, f"LFS object {oid} has a different size")
        return _json_response({"success": True})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> _Response:
        if revision not in (DEFAULT_BRANCH, f"refs/heads/{DEFAULT_BRANCH}"):
            if _COMMIT_SHA_RE.fullmatch(revision):
                raise _HttpError(400, f"Cannot commit on a commit id ({revision}); the stand-in only has 'main'")
            raise _HttpError(404, f"Invalid rev id: {revision}", error_code="RevisionNotFound")
        header: dict[str, Any] | None = None
        operations: list[tuple[str, dict[str, Any]]] = []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = _parse_json_body(line)
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise _HttpError(400, "Malformed NDJSON commit line")
            if item.get("key") == "header":
                header = item["value"]
            else:
                operations.append((str(item.get("key")), item["value"]))
        if header is None or not str(header.get("summary") or "").strip():
            raise _HttpError(400, "Commit header with a non-empty 'summary' is required")
        message = str(header["summary"])
        description = str(header.get("description") or "")

        parent = repo.head
        if header.get("parentCommit") not in (None, parent.oid):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(parent.tree)
        added: list[str] = []
        deleted: list[str] = []
        for key, value in operations:
            path = _validate_repo_path(
                str(value.get("path", "")).strip("/") if key == "deletedFolder" else str(value.get("path", ""))
            )
            if key == "file":
                encoding = str(value.get("encoding") or "base64").lower()
                content = str(value.get("content") or "")
                try:
                    data = base64.b64decode(content, validate=True) if encoding == "base64" else content.encode()
                except binascii.Error as err:
                    raise _HttpError(400, f"Invalid base64 content for {path}") from err
                tree[path] = _FileEntry(self._store_bytes(data), len(data), _git_blob_sha1(data), False)
                added.append(path)
            elif key == "lfsFile":
                oid = str(value.get("oid") or "").lower()
                stored = self._object_path(oid)
                if not _SHA256_RE.fullmatch(oid) or not stored.exists():
                    raise _HttpError(400, f"LFS pointer for {path} points to an object that was not uploaded: {oid}")
                tree[path] = self._entry_for_object(oid, lfs=True)
                added.append(path)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", error_code="EntryNotFound")
                deleted.append(path)
            elif key == "deletedFolder":
                removed = [p for p in tree if p.startswith(f"{path}/")]
                if not removed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {path}", error_code="EntryNotFound")
                for p in removed:
                    del tree[p]
                deleted.extend(removed)
            else:
                raise _HttpError(400, f"Unsupported commit operation: {key}")
        self._check_no_file_folder_clash(tree)

        commit = self._make_commit(repo, tree, message, description)
        self._write_to_disk(repo, tree, added, deleted)
        repo.history.append(commit)
        self.commits.append(
            {
                "repo_id": repo.repo_id,
                "repo_type": repo.repo_type,
                "message": message,
                "description": description,
                "paths": added,
                "deleted": deleted,
                "parent": parent.oid,
                "oid": commit.oid,
            }
        )
        return _json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.url}/{repo.url_path}/commit/{commit.oid}",
                "hookOutput": "",
            }
        )

    def _entry_for_object(self, sha256: str, *, lfs: bool) -> _FileEntry:
        stored = self._object_path(sha256)
        size = stored.stat().st_size
        sha1 = hashlib.sha1(b"blob %d\0" % size)
        with stored.open("rb") as file:
            while chunk := file.read(_CHUNK_SIZE):
                sha1.update(chunk)
        return _FileEntry(sha256, size, sha1.hexdigest(), lfs)

    @staticmethod
    def _check_no_file_folder_clash(tree: dict[str, _FileEntry]) -> None:
        for path in tree:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in tree:
                    raise _HttpError(400, f"Path {path!r} conflicts with file {'/'.join(parts[:i])!r}")

    def _write_to_disk(self, repo: _Repo, tree: dict[str, _FileEntry], added: list[str], deleted: list[str]) -> None:
        """Mirror a commit into the repo folder (atomic replace per file)."""
        for path in deleted:
            if path not in tree:
                (repo.directory / path).unlink(missing_ok=True)
        for path in added:
            target = repo.directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.hub-stand-in-{secrets.token_hex(4)}.tmp")
            shutil.copyfile(self._object_path(tree[path].sha256), tmp)
            os.replace(tmp, target)
