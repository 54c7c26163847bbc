"""Hub output: one commit per dataset repo through ``huggingface_hub``, retried on transient failures, and the checks
made before any work (the token is accepted and may write, each dataset repo exists and may be written).

``huggingface_hub`` retries its own preupload and LFS calls, but not the commit request of ``create_commit``; that
one call is retried here (see :mod:`rqvae_ray.inputs.retry`). The token is never passed around:
``huggingface_hub`` reads it (``HF_TOKEN`` or the saved login) in each process that uploads.

Files written on another node are pre-uploaded there (:func:`preupload_files`); the commit, made where the run was
started, then only refers to them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from rqvae_ray.errors import (
    MissingTokenError,
    RepoNotFoundError,
    RepoNotWritableError,
    RqvaeRayError,
    TokenRejectedError,
    UploadError,
)
from rqvae_ray.inputs.retry import call_with_retries, describe_error

# The Hub's answer to a commit whose parent_commit is no longer the branch head: another commit landed first.
HEAD_MOVED = 412
# Times a commit is made again on the new head after that.
CONFLICT_ATTEMPTS = 5


def require_token() -> None:
    """Raise :class:`MissingTokenError` unless ``HF_TOKEN`` or a saved login is available (checked before work)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UploadError("HF_HUB_OFFLINE is set, so nothing can be uploaded; pass --out-dir to write locally")
    if not get_token():
        raise MissingTokenError(
            "uploading needs a Hugging Face token: set HF_TOKEN or run 'hf auth login' (or pass --out-dir only)"
        )


def check_token(retries: int = 5, backoff_s: float = 1.0) -> None:
    """Raise :class:`TokenRejectedError` when the Hub refuses the token or it is read-only (checked before work)."""
    from huggingface_hub import HfApi

    try:
        info = call_with_retries(HfApi().whoami, retries, backoff_s)
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries stops the run before its work
        if _status(exc) == 401:
            raise TokenRejectedError(
                "the Hub rejects the Hugging Face token (revoked or mistyped?): set a valid HF_TOKEN or run "
                "'hf auth login'"
            ) from None
        raise UploadError(
            f"the Hugging Face token could not be checked ({describe_error(exc)}); check HF_ENDPOINT or try later"
        ) from None
    access = (info.get("auth") or {}).get("accessToken") or {}
    if access.get("role") == "read":
        raise TokenRejectedError(
            "the Hugging Face token is read-only: uploading needs one with write access (set HF_TOKEN or run "
            "'hf auth login')"
        )


def check_writable(repo_id: str, retries: int = 5, backoff_s: float = 1.0) -> None:
    """Raise unless dataset repo ``repo_id`` exists and the token may write to it (checked before its work)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        call_with_retries(lambda: HfApi().auth_check(repo_id, repo_type="dataset", write=True), retries, backoff_s)
    except RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"dataset repo {repo_id} not found on the Hub (or not visible with this token); create it, or pair the "
            "model with an existing one (MODEL_ID=ORG/DATASET)",
            repo=repo_id,
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries fails the dataset before its work
        if _status(exc) in (401, 403):
            raise RepoNotWritableError(
                f"this Hugging Face token may not write to dataset repo {repo_id}; use a token with write access to it",
                repo=repo_id,
            ) from None
        raise UploadError(
            f"write access to dataset repo {repo_id} could not be checked ({describe_error(exc)}); check "
            "HF_ENDPOINT or try later",
            repo=repo_id,
        ) from None


def read_repo_file(
    repo_id: str, path_in_repo: str, revision: str | None, retries: int = 5, backoff_s: float = 1.0
) -> bytes | None:
    """A file of dataset repo ``repo_id`` at ``revision`` (None: its default branch); None when it has no such file."""
    from huggingface_hub import HfApi

    try:
        return call_with_retries(lambda: _read(HfApi(), repo_id, path_in_repo, revision), retries, backoff_s)
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries is reported the same way
        raise UploadError(
            f"cannot read {path_in_repo} of dataset repo {repo_id} ({describe_error(exc)}); check HF_ENDPOINT or "
            "try later",
            repo=repo_id,
        ) from None


def _status(exc: Exception) -> int | None:
    """The HTTP status of a failed Hub call; None when it got no answer."""
    response = exc.response if isinstance(exc, HfHubHTTPError) else None
    return None if response is None else response.status_code


@dataclass(frozen=True)
class Preuploaded:
    """The commit operations of files pre-uploaded by one process (see :func:`preupload_files`), and where the files
    stay until the commit is made (named when it fails)."""

    operations: list
    kept_in: str


@dataclass(frozen=True)
class ManifestUpdate:
    """The manifest committed with the files: its path in the repo, and how the repo's current manifest (its bytes,
    None when it has none) becomes the committed one."""

    path_in_repo: str
    update: Callable[[bytes | None], bytes]


def preupload_files(repo_id: str, files: list[tuple[Path, str]], retries: int = 5, backoff_s: float = 1.0) -> list:
    """Upload ``(local path, path in repo)`` pairs of dataset repo ``repo_id`` ahead of its commit, from the process
    (and node) that holds them: the commit operations that another process passes to :func:`commit_files`.

    Large files go to the Hub's storage now (``preupload_lfs_files``) and the operation only names them; a file the
    Hub takes inline in the commit request travels in its operation, as bytes.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files]
    try:
        call_with_retries(
            lambda: HfApi().preupload_lfs_files(repo_id, operations, repo_type="dataset", free_memory=True),
            retries,
            backoff_s,
        )
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries is reported the same way
        raise UploadError(f"upload to dataset repo {repo_id} failed: {describe_error(exc)}", repo=repo_id) from None
    return [
        operation
        if operation._is_uploaded  # noqa: SLF001 - huggingface_hub's mark of a pre-uploaded file
        else CommitOperationAdd(path_in_repo=operation.path_in_repo, path_or_fileobj=Path(src).read_bytes())
        for operation, (src, _) in zip(operations, files, strict=True)
    ]


def commit_files(
    repo_id: str,
    files: list[tuple[Path, str]],
    message: str,
    retries: int = 5,
    backoff_s: float = 1.0,
    manifest: ManifestUpdate | None = None,
    prepared: Sequence = (),
) -> str:
    """Upload ``(local path, path in repo)`` pairs to dataset repo ``repo_id`` in one commit, with the operations
    ``prepared`` by :func:`preupload_files` elsewhere; returns the commit oid.

    With ``manifest`` the repo's manifest is read at the head of its branch and the commit is made on that head only
    (``parent_commit``): when another commit lands in between, the manifest is read and updated again, so that no
    run's entries are lost to another's.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files]
    operations.extend(prepared)
    summary, _, description = message.partition("\n\n")

    def commit() -> str:
        extra, parent = [], None
        if manifest is not None:
            parent = call_with_retries(lambda: api.repo_info(repo_id, repo_type="dataset").sha, retries, backoff_s)
            current = call_with_retries(lambda: _read(api, repo_id, manifest.path_in_repo, parent), retries, backoff_s)
            extra = [CommitOperationAdd(path_in_repo=manifest.path_in_repo, path_or_fileobj=manifest.update(current))]
        info = call_with_retries(
            lambda: api.create_commit(
                repo_id,
                [*operations, *extra],
                commit_message=summary,
                commit_description=description,
                repo_type="dataset",
                parent_commit=parent,
            ),
            retries,
            backoff_s,
        )
        return info.oid

    attempts = 0
    try:
        while True:
            try:
                return commit()
            except HfHubHTTPError as exc:
                attempts += 1
                moved = exc.response is not None and exc.response.status_code == HEAD_MOVED
                if manifest is None or not moved or attempts >= CONFLICT_ATTEMPTS:
                    raise
    except RqvaeRayError:
        raise  # ours already says what is wrong (a manifest in the repo that cannot be read, say)
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries is reported the same way
        raise UploadError(f"upload to dataset repo {repo_id} failed: {describe_error(exc)}", repo=repo_id) from None


def _read(api, repo_id: str, path_in_repo: str, revision: str | None) -> bytes | None:
    """A file of dataset repo ``repo_id`` at ``revision``; None when the repo has no such file."""
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(api.hf_hub_download(repo_id, path_in_repo, repo_type="dataset", revision=revision)).read_bytes()
    except LocalEntryNotFoundError:
        raise  # the Hub could not be reached: not "no manifest", which would drop the repo's entries
    except EntryNotFoundError:
        return None
