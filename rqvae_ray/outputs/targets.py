"""The typed contract between a run and its dataset writer: what to write for each model (:class:`ModelTarget`),
for the whole dataset (:class:`DatasetOutput`), and what came of each file (:class:`Published`, :class:`Refused`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqvae_ray.core.contract import OutputSpec
from rqvae_ray.outputs.existing_rows import ExistingRows
from rqvae_ray.outputs.manifest import ManifestEntry, Provenance


@dataclass(frozen=True, kw_only=True)
class ModelTarget:
    """What the writer needs to know about one model's output."""

    model_id: str
    slot: int  # where this model's columns are in the blocks
    filename: str  # codebooks-<model>.<csv|parquet>
    codebook_sizes: tuple[int, ...]
    provenance: Provenance
    sinkhorn_levels: tuple[int, ...] = ()  # levels trained with Sinkhorn assignment (SIDs use the nearest codeword)
    features_rows_sha256: str = ""  # rows_digests of the features of Pids 1..N
    existing: ExistingRows | None = None  # the rows the file starts with
    codebooks: tuple[np.ndarray, ...] = ()  # the model's codebooks (float32), to rebuild rows from their codes
    resume_key: str = ""  # the key of its resume state (empty: no resume state is kept)
    resume_rows: int = 0  # rows 1..resume_rows come from the journal of an interrupted run
    resume_seconds: float = 0.0  # the encode seconds of those rows


@dataclass(frozen=True, kw_only=True)
class DatasetOutput:
    """Every model's output of one dataset: ``folder`` is where the files go (None: upload only, into a private
    temporary folder); blocks start at Pid ``first_pid``."""

    repo: str
    targets: tuple[ModelTarget, ...]
    folder: Path | None
    base_folder: str
    spec: OutputSpec
    num_pois: int
    first_pid: int = 1


@dataclass(frozen=True)
class Published:
    """One published codebooks file: its manifest entry and where it is."""

    entry: ManifestEntry
    path: str

    @property
    def model_id(self) -> str:
        return self.entry.model_id


@dataclass(frozen=True)
class Refused:
    """A model whose file was not published: ``reason`` is the one-line why."""

    model_id: str
    reason: str
