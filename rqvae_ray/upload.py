"""Hub output: one commit per dataset repo through ``huggingface_hub``, retried on transient failures.

``huggingface_hub`` retries its own preupload and LFS calls, but not the commit request of ``create_commit``; that
one call is retried here (see :mod:`rqvae_ray.retry`). The token is never passed around:
``huggingface_hub`` reads it (``HF_TOKEN`` or the saved login) in the process that uploads.
"""

from __future__ import annotations

from pathlib import Path

from rqvae_ray.errors import MissingTokenError, UploadError
from rqvae_ray.retry import call_with_retries, describe_error


def require_token() -> None:
    """Raise :class:`MissingTokenError` unless ``HF_TOKEN`` or a saved login is available (checked before work)."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UploadError("HF_HUB_OFFLINE is set, so nothing can be uploaded; pass --out-dir to write locally")
    if not get_token():
        raise MissingTokenError(
            "uploading needs a Hugging Face token: set HF_TOKEN or run 'hf auth login' (or pass --out-dir only)"
        )


def commit_files(
    repo_id: str, files: list[tuple[Path, str]], message: str, retries: int = 5, backoff_s: float = 1.0
) -> str:
    """Upload ``(local path, path in repo)`` pairs to dataset repo ``repo_id`` in one commit; returns its oid."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    operations = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(src)) for src, dest in files]
    summary, _, description = message.partition("\n\n")
    try:
        info = call_with_retries(
            lambda: api.create_commit(
                repo_id, operations, commit_message=summary, commit_description=description, repo_type="dataset"
            ),
            retries,
            backoff_s,
        )
    except Exception as exc:  # noqa: BLE001 - any failure left after the retries is reported the same way
        raise UploadError(f"upload to dataset repo {repo_id} failed: {describe_error(exc)}", repo=repo_id) from None
    return info.oid
