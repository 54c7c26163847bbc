"""Stores: where checkpoints and POI datasets come from (a local hub directory or the Hugging Face Hub).

Both stores speak the same layout, which is a contract:

* ``models/<org>/<model_name>/rqvae_best.pt``
* ``datasets/<org>/<dataset>/RQVAE Dataset/poi_features.pt`` (or ``RQVAE Dataset/poi_features/*.parquet``)
* ``datasets/<org>/<dataset>/RQVAE Dataset/metadata.json``
* ``datasets/<org>/<dataset>/Intermediate Files/pid_mapping.csv``

In the Hub the first level is the repo (model repo ``<org>/<model_name>``, dataset repo ``<org>/<dataset>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rqvae_ray.errors import FileNotInRepoError, NotCachedError, RepoNotFoundError
from rqvae_ray.model_ids import ModelSpec
from rqvae_ray.retry import call_with_retries

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

    def _inside(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts).resolve()
        if not path.is_relative_to(self.root):
            raise RepoNotFoundError(f"{'/'.join(parts)} points outside the hub directory {self.root}")
        return path

    def checkpoint(self, spec: ModelSpec) -> tuple[bytes, str]:
        """The checkpoint bytes of a model and a revision label (``local``)."""
        path = self._inside("models", spec.org, spec.name, CHECKPOINT_FILE)
        if not path.is_file():
            raise RepoNotFoundError(
                f"model {spec.model_id} not found: no {path}; check the model ID or --hub-dir", repo=spec.model_id
            )
        return path.read_bytes(), "local"

    def dataset_files(self, org: str, dataset: str) -> DatasetFiles:
        """Paths of a dataset's features, metadata and Pid mapping (missing optional files are ``None``)."""
        base = self._inside("datasets", org, dataset)
        if not base.is_dir():
            raise RepoNotFoundError(
                f"dataset {org}/{dataset} not found: no directory {base}; check --hub-dir", repo=f"{org}/{dataset}"
            )
        shards = sorted((base / FEATURES_PARQUET_DIR).glob("*.parquet"))
        features = shards or [base / FEATURES_FILE]
        if not features[0].is_file():
            raise FileNotInRepoError(
                f"dataset {org}/{dataset}: no features at {base / FEATURES_FILE} or {base / FEATURES_PARQUET_DIR}/",
                repo=f"{org}/{dataset}",
                filename=FEATURES_FILE,
            )
        metadata, mapping = base / METADATA_FILE, base / PID_MAPPING_FILE
        return DatasetFiles(
            repo=f"{org}/{dataset}",
            features=features,
            metadata=metadata if metadata.is_file() else None,
            pid_mapping=mapping if mapping.is_file() else None,
            revision="local",
        )


class HfHub:
    """The Hugging Face Hub (or a server at ``HF_ENDPOINT``), through ``huggingface_hub`` and its cache."""

    def __init__(self, revision: str | None = None, dataset_revision: str | None = None) -> None:
        self.revisions = {"model": revision, "dataset": dataset_revision}

    def _download(self, repo_id: str, filename: str, repo_type: str) -> tuple[Path, str]:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        kind = repo_type
        revision = self.revisions[repo_type]
        try:
            path = Path(
                call_with_retries(lambda: hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision))
            )
        except RepositoryNotFoundError:
            raise RepoNotFoundError(
                f"{kind} repo {repo_id} not found on the Hub (or not visible with this token); check the ID",
                repo=repo_id,
            ) from None
        except RevisionNotFoundError:
            raise RepoNotFoundError(f"{kind} repo {repo_id} has no revision {revision!r}", repo=repo_id) from None
        # LocalEntryNotFoundError is an EntryNotFoundError: it must be caught first.
        except LocalEntryNotFoundError:
            raise NotCachedError(
                f"{kind} repo {repo_id}: file {filename!r} is not in the local cache and the Hub cannot be reached "
                "(offline?); run once online or unset HF_HUB_OFFLINE",
                repo=repo_id,
                filename=filename,
            ) from None
        except EntryNotFoundError:
            raise FileNotInRepoError(
                f"{kind} repo {repo_id} has no file {filename!r}", repo=repo_id, filename=filename
            ) from None
        return path, _snapshot_commit(path)

    def checkpoint(self, spec: ModelSpec) -> tuple[bytes, str]:
        """The checkpoint bytes of a model and the commit hash it was read at."""
        path, commit = self._download(spec.model_id, CHECKPOINT_FILE, "model")
        return path.read_bytes(), commit

    def dataset_files(self, org: str, dataset: str) -> DatasetFiles:
        """Download a dataset's files into the HF cache and return their paths."""
        repo = f"{org}/{dataset}"
        try:
            features, commit = self._download(repo, FEATURES_FILE, "dataset")
            shards = [features]
        except FileNotInRepoError:
            shards, commit = self._parquet_shards(repo)
        metadata, _ = self._optional(repo, METADATA_FILE)
        mapping, _ = self._optional(repo, PID_MAPPING_FILE)
        return DatasetFiles(repo, shards, metadata, mapping, commit)

    def _parquet_shards(self, repo: str) -> tuple[list[Path], str]:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                revision=self.revisions["dataset"],
                allow_patterns=[f"{FEATURES_PARQUET_DIR}/*.parquet"],
            )
        )
        shards = sorted((folder / FEATURES_PARQUET_DIR).glob("*.parquet"))
        if not shards:
            raise FileNotInRepoError(
                f"dataset repo {repo} has neither {FEATURES_FILE!r} nor Parquet shards in {FEATURES_PARQUET_DIR!r}",
                repo=repo,
                filename=FEATURES_FILE,
            )
        return shards, folder.name

    def _optional(self, repo: str, filename: str) -> tuple[Path | None, str]:
        try:
            return self._download(repo, filename, "dataset")
        except FileNotInRepoError:
            return None, ""


def _snapshot_commit(path: Path) -> str:
    """The commit hash of a file in the HF cache: ``.../snapshots/<commit>/<filename>``."""
    parts = path.parts
    if "snapshots" in parts:
        index = len(parts) - 1 - parts[::-1].index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return "unknown"
