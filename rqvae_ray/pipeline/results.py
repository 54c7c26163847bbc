"""What a run gives back: one :class:`ModelResult` per model."""

from __future__ import annotations

from dataclasses import dataclass, field

from rqvae_ray.outputs.manifest import ExportRecord


@dataclass
class ModelResult:
    """Outcome of one model: ``encode_seconds`` is the time its encoder took (summed over its actors or threads),
    ``dataset_seconds`` the wall time of its whole dataset (loading, encoding every model, writing, uploading)."""

    model_id: str
    dataset: str  # the dataset repo, org/dataset
    ok: bool
    error: str = ""
    skipped: bool = False
    rows: int = 0
    encode_seconds: float = 0.0
    dataset_seconds: float = 0.0
    path: str = ""
    sha256: str = ""
    commit: str = ""
    quality: dict = field(default_factory=dict)
    exports: list[ExportRecord] = field(default_factory=list)  # the files written beside its codebooks file

    @property
    def unique_sids(self) -> int:
        return int(self.quality.get("unique_sids", 0))

    @property
    def shared_pois(self) -> int:
        return int(self.quality.get("pois_in_collided_buckets", 0))
