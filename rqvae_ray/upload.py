"""Hub output: one commit per dataset repo through ``huggingface_hub``, retried on transient failures.

``huggingface_hub`` retries its own preupload and LFS calls, but not the commit request of ``create_commit``; that
one call is retried here with exponential backoff (honouring ``Retry-After``). The token is never passed around:
``huggingface_hub`` reads it (``HF_TOKEN`` or the saved login) in the process that uploads.
"""

from __future__ import annotations

import time
from pathlib import Path

TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class UploadError(RuntimeError):
    """An upload that failed for good; the message says why (never with the token)."""


class MissingTokenError(UploadError):
    """An upload was requested but no Hugging Face token is configured."""


def require_token() -> None:
    """Raise :class:`MissingTokenError` unless ``HF_TOKEN`` or a saved login is available (checked before work)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UploadError("HF_HUB_OFFLINE is set, so nothing can be uploaded; pass --out-dir to write locally")
    if not get_token():
        raise MissingTokenError(
            "uploading needs a Hugging Face token: set HF_TOKEN or run 'hf auth login' (or pass --out-dir only)"
        )


def _retry_after(exc: Exception, attempt: int, backoff_s: float) -> float | None:
    """Seconds to wait before retrying ``exc``, or None when it is permanent."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status not in TRANSIENT_STATUS:
            return None
        header = exc.response.headers.get("Retry-After") if exc.response is not None else None
        if header is not None and header.strip().isdigit():
            return max(float(header), backoff_s * 2**attempt)
        return backoff_s * 2**attempt
    if isinstance(exc, httpx2.TransportError):
        return backoff_s * 2**attempt
    return None


def _describe(exc: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        server = (exc.server_message or "").strip().splitlines()
        return f"HTTP {exc.response.status_code}" + (f": {server[0][:200]}" if server else "")
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"


def commit_files(
    repo_id: str, files: list[tuple[Path, str]], message: str, retries: int = 5, backoff_s: float = 1.0
) -> str:
    """Upload ``(local path, path in repo)`` pairs to dataset repo ``repo_id`` in one commit; returns its oid."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files]
    summary, _, description = message.partition("\n\n")
    attempt = 0
    while True:
        try:
            info = api.create_commit(
                repo_id, operations, commit_message=summary, commit_description=description, repo_type="dataset"
            )
            return info.oid
        except Exception as exc:  # noqa: BLE001 - classified below; anything unknown is permanent
            wait = _retry_after(exc, attempt, backoff_s)
            if wait is None or attempt >= retries:
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise UploadError(f"upload to dataset repo {repo_id} failed{tries}: {_describe(exc)}") from None
        time.sleep(wait)
        attempt += 1
