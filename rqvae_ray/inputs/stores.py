"""Stores: where checkpoints and POI datasets come from (a local hub directory or the Hugging Face Hub).

Both stores speak the same layout, which is a contract:

* ``models/<org>/<model_name>/rqvae_best.pt``
* ``datasets/<org>/<dataset>/RQVAE Dataset/poi_features.pt`` (or ``RQVAE Dataset/poi_features/*.parquet``)
* ``datasets/<org>/<dataset>/RQVAE Dataset/metadata.json``
* ``datasets/<org>/<dataset>/Intermediate Files/pid_mapping.csv``

In the Hub the first level is the repo (model repo ``<org>/<model_name>``, dataset repo ``<org>/<dataset>``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from rqvae_ray.errors import FileNotInRepoError, NotCachedError, RepoNotFoundError
from rqvae_ray.inputs.model_ids import ModelSpec
from rqvae_ray.inputs.retry import call_with_retries, describe_error

CHECKPOINT_FILE = "rqvae_best.pt"
FEATURES_FILE = "RQVAE Dataset/poi_features.pt"
FEATURES_PARQUET_DIR = "RQVAE Dataset/poi_features"
METADATA_FILE = "RQVAE Dataset/metadata.json"
PID_MAPPING_FILE = "Intermediate Files/pid_mapping.csv"


@dataclass(frozen=True)
class DatasetFiles:
    """Local paths of one dataset's files and the revision they came from."""

    repo: str  # "<org>/<dataset>"
    features: list[Path]  # one .pt file, or the .parquet shards in order
    metadata: Path | None
    pid_mapping: Path | None
    revision: str

    @property
    def is_parquet(self) -> bool:
        return self.features[0].suffix == ".parquet"


class LocalHub:
    """A hub laid out on a local (or shared) file system."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise RepoNotFoundError(f"hub directory {self.root} does not exist; pass an existing --hub-dir")

    def _inside(self, repo: str, *parts: str) -> Path:
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise RepoNotFoundError(f"{'/'.join(parts)} points outside the hub directory {self.root}", repo=repo)
        return path

    def checkpoint(self, spec: ModelSpec) -> tuple[bytes, str]:
        """The checkpoint bytes of a model and a revision label (``local``)."""
        base = self._inside(spec.model_id, "models", spec.org, spec.name)
        if not base.is_dir():
            raise RepoNotFoundError(
                f"model {spec.model_id} not found: no directory {base}; check the model ID or --hub-dir",
                repo=spec.model_id,
            )
        path = base / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotInRepoError(
                f"model {spec.model_id} has no {CHECKPOINT_FILE} (looked for {path}); restore it",
                repo=spec.model_id,
                filename=CHECKPOINT_FILE,
            )
        return path.read_bytes(), "local"

    def dataset_files(self, org: str, dataset: str) -> DatasetFiles:
        """Paths of a dataset's features, metadata and Pid mapping (missing optional files are ``None``)."""
        repo = f"{org}/{dataset}"
        base = self._inside(repo, "datasets", org, dataset)
        if not base.is_dir():
            raise RepoNotFoundError(f"dataset {repo} not found: no directory {base}; check --hub-dir", repo=repo)
        features = _shards_in(base) or [base / FEATURES_FILE]
        if not features[0].is_file():
            raise FileNotInRepoError(
                f"dataset {repo}: no features at {base / FEATURES_FILE} or {base / FEATURES_PARQUET_DIR}/*.parquet",
                repo=repo,
                filename=FEATURES_FILE,
            )
        metadata, mapping = base / METADATA_FILE, base / PID_MAPPING_FILE
        return DatasetFiles(
            repo=repo,
            features=features,
            metadata=metadata if metadata.is_file() else None,
            pid_mapping=mapping if mapping.is_file() else None,
            revision="local",
        )


class HfHub:
    """The Hugging Face Hub (or a server at ``HF_ENDPOINT``), through ``huggingface_hub`` and its cache."""

    def __init__(
        self, revision: str | None = None, dataset_revision: str | None = None, backoff_s: float = 1.0
    ) -> None:
        self.revisions = {"model": revision, "dataset": dataset_revision}
        self.backoff_s = backoff_s

    def _fetch(self, repo_id: str, repo_type: str, filename: str, call: Callable[[], str]) -> Path:
        """``call()``, a download of ``filename`` into the HF cache, with retries; failures become our errors."""
        import httpx2
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        revision = self.revisions[repo_type]
        flag = "--revision" if repo_type == "model" else "--dataset-revision"
        try:
            return Path(call_with_retries(call, backoff_s=self.backoff_s))
        except RepositoryNotFoundError:
            raise RepoNotFoundError(
                f"{repo_type} repo {repo_id} not found on the Hub (or not visible with this token); check the ID",
                repo=repo_id,
            ) from None
        except RevisionNotFoundError:
            raise RepoNotFoundError(
                f"{repo_type} repo {repo_id} has no revision {revision!r}; check {flag}", repo=repo_id
            ) from None
        # LocalEntryNotFoundError is an EntryNotFoundError: it must be caught first.
        except LocalEntryNotFoundError as exc:
            cause = exc.__cause__
            if cause is None or isinstance(cause, OfflineModeIsEnabled):
                why, advice = "the Hub cannot be reached (offline?)", "run once online or unset HF_HUB_OFFLINE"
            else:
                why, advice = f"the Hub did not answer ({describe_error(cause)})", "check HF_ENDPOINT or try later"
            raise NotCachedError(
                f"{repo_type} repo {repo_id}: {filename!r} is not in the local cache and {why}; {advice}",
                repo=repo_id,
                filename=filename,
            ) from None
        except EntryNotFoundError:
            raise FileNotInRepoError(
                f"{repo_type} repo {repo_id} has no file {filename!r}", repo=repo_id, filename=filename
            ) from None
        except (HfHubHTTPError, httpx2.TransportError) as exc:
            raise NotCachedError(
                f"{repo_type} repo {repo_id}: downloading {filename!r} failed ({describe_error(exc)}) and it is not "
                "in the local cache; check access to the repo or try later",
                repo=repo_id,
                filename=filename,
            ) from None

    def _download(self, repo_id: str, filename: str, repo_type: str) -> Path:
        from huggingface_hub import hf_hub_download

        call = partial(hf_hub_download, repo_id, filename, repo_type=repo_type, revision=self.revisions[repo_type])
        return self._fetch(repo_id, repo_type, filename, call)

    def checkpoint(self, spec: ModelSpec) -> tuple[bytes, str]:
        """The checkpoint bytes of a model and the commit hash it was read at."""
        path = self._download(spec.model_id, CHECKPOINT_FILE, "model")
        return path.read_bytes(), _snapshot_commit(path)

    def dataset_files(self, org: str, dataset: str) -> DatasetFiles:
        """Download a dataset's files into the HF cache and return their paths."""
        repo = f"{org}/{dataset}"
        try:
            shards = [self._download(repo, FEATURES_FILE, "dataset")]
        except (FileNotInRepoError, NotCachedError) as missing:
            shards = self._parquet_shards(repo, missing)
        metadata = self._optional(repo, METADATA_FILE)
        mapping = self._optional(repo, PID_MAPPING_FILE)
        return DatasetFiles(repo, shards, metadata, mapping, _snapshot_commit(shards[0]))

    def _parquet_shards(self, repo: str, missing: FileNotInRepoError | NotCachedError) -> list[Path]:
        """The Parquet shards of a dataset whose ``.pt`` is ``missing`` (absent, or offline: not cached)."""
        from huggingface_hub import snapshot_download

        pattern = f"{FEATURES_PARQUET_DIR}/*.parquet"
        call = partial(
            snapshot_download, repo, repo_type="dataset", revision=self.revisions["dataset"], allow_patterns=[pattern]
        )
        try:
            folder = self._fetch(repo, "dataset", pattern, call)
        except NotCachedError:
            # Neither form is cached: name the .pt when that was not cached either, else why the shards failed.
            if isinstance(missing, NotCachedError):
                raise missing from None
            raise
        shards = _shards_in(folder)
        if shards:
            return shards
        if isinstance(missing, NotCachedError):
            raise missing
        raise FileNotInRepoError(
            f"dataset repo {repo} has neither {FEATURES_FILE!r} nor Parquet shards {pattern!r}; add one of them",
            repo=repo,
            filename=FEATURES_FILE,
        )

    def published_output(self, repo: str, folder: str, filename: str, manifest: str) -> tuple[Path, Path | None] | None:
        """Download ``folder/filename`` (a published output) and ``folder/manifest`` of dataset repo ``repo`` at the
        dataset revision; None when the repo has no such output file."""
        path = self._optional(repo, f"{folder}/{filename}")
        return None if path is None else (path, self._optional(repo, f"{folder}/{manifest}"))

    def _optional(self, repo: str, filename: str) -> Path | None:
        try:
            return self._download(repo, filename, "dataset")
        except FileNotInRepoError:
            return None


def _shards_in(base: Path) -> list[Path]:
    """The Parquet shards of the dataset folder ``base``, in file-name order."""
    return sorted(p for p in (base / FEATURES_PARQUET_DIR).glob("*.parquet") if p.is_file())


def _snapshot_commit(path: Path) -> str:
    """The commit hash of a file in the HF cache: ``.../snapshots/<commit>/<filename>``."""
    parts = path.parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return "unknown"
