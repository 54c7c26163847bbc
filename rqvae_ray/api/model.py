"""The in-process encoder, for notebooks and services that need the SID of a few POIs now (a new venue at serving
time), without Ray: the same checkpoint loading and the same float64 encoder as the pipeline, so the same bits."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights, load_checkpoint_bytes, load_checkpoint_file
from rqvae_ray.core.encoder import Encoder, SparseRows
from rqvae_ray.errors import DatasetError
from rqvae_ray.inputs.features import check_finite


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
        or :class:`~rqvae_ray.core.encoder.SparseRows`.
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
        columns = [np.unique(_column_indices(index, row)) for index, row in enumerate(features)]
        for index, (row, unique) in enumerate(zip(features, columns, strict=True)):
            if len(unique) != len(row):
                raise DatasetError("", f"POI {index} lists a feature column twice; give each nonzero column once")
        indptr = np.zeros(len(columns) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in columns], out=indptr[1:])
        indices = np.concatenate(columns) if columns else np.empty(0, dtype=np.int64)
        return SparseRows(indptr, indices, None)


def _column_indices(index: int, row: Sequence[int]) -> np.ndarray:
    """POI ``index``'s nonzero feature columns as int64; anything but integers is refused (3.9 is no column)."""
    values = np.asarray(row)
    if values.ndim != 1:
        raise DatasetError("", f"POI {index} is not a flat list of feature column indices; give one list per POI")
    if values.size and values.dtype.kind not in "iu":
        bad = next((v for v in row if not isinstance(v, numbers.Integral) or isinstance(v, bool | np.bool_)), row[0])
        shown = bad.item() if isinstance(bad, np.generic) else bad
        raise DatasetError(
            "",
            f"POI {index} lists {shown!r} as a feature column; columns are integer indices (give dense features as a "
            "2-D array)",
        )
    return values.astype(np.int64)


def load_model(source: str | Path | bytes) -> Model:
    """Load a checkpoint (a path, or its bytes) safely (``torch.load(weights_only=True)``) for in-process encoding."""
    if isinstance(source, bytes | bytearray):
        return Model(load_checkpoint_bytes(bytes(source), source="checkpoint bytes"))
    return Model(load_checkpoint_file(source))
