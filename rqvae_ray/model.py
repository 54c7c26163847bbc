"""The in-process encoder, for notebooks and services that need the SID of a few POIs now (a new venue at serving
time), without Ray: the same checkpoint loading and the same float64 encoder as the pipeline, so the same bits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqvae_ray.checkpoint import ModelWeights, load_checkpoint_bytes, load_checkpoint_file
from rqvae_ray.encoder import Encoder, SparseRows
from rqvae_ray.errors import DatasetError
from rqvae_ray.features import check_finite


@dataclass(frozen=True)
class Model:
    """A frozen RQ-VAE encoder and residual quantizer loaded from a checkpoint."""

    weights: ModelWeights

    @property
    def input_dim(self) -> int:
        return self.weights.input_dim

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return self.weights.codebook_sizes

    def encode(self, features: np.ndarray | Sequence[Sequence[int]] | SparseRows) -> tuple[np.ndarray, np.ndarray]:
        """``codes`` int32 [n, levels] and ``vectors`` float32 [n, latent] of ``n`` POIs.

        ``features`` is a dense [n, input_dim] array, or one sequence of nonzero column indices per POI (multi-hot),
        or :class:`~rqvae_ray.encoder.SparseRows`.
        """
        return Encoder(self.weights).encode(self._rows(features))

    def _rows(self, features: np.ndarray | Sequence[Sequence[int]] | SparseRows) -> SparseRows:
        if isinstance(features, SparseRows):
            return features
        if isinstance(features, np.ndarray) and features.ndim == 2:
            if features.shape[1] != self.input_dim:
                raise DatasetError(
                    "", f"the features have {features.shape[1]} columns but the model takes {self.input_dim}"
                )
            dense = features.astype(np.float32, copy=False)
            check_finite(dense, "features")
            return SparseRows.from_dense(dense)
        if isinstance(features, np.ndarray):
            raise DatasetError(
                "", f"dense features must be a 2-D array [POIs, {self.input_dim}], got {features.ndim}-D"
            )
        columns = [np.unique(np.asarray(row, dtype=np.int64)) for row in features]
        for index, (row, unique) in enumerate(zip(features, columns, strict=True)):
            if len(unique) != len(row):
                raise DatasetError("", f"POI {index} lists a feature column twice; give each nonzero column once")
        indptr = np.zeros(len(columns) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in columns], out=indptr[1:])
        indices = np.concatenate(columns) if columns else np.empty(0, dtype=np.int64)
        return SparseRows(indptr, indices, None)


def load_model(source: str | Path | bytes) -> Model:
    """Load a checkpoint (a path, or its bytes) safely (``torch.load(weights_only=True)``) for in-process encoding."""
    if isinstance(source, bytes | bytearray):
        return Model(load_checkpoint_bytes(bytes(source), source="checkpoint bytes"))
    return Model(load_checkpoint_file(source))
