"""The public SID stage for users' own Ray Data pipelines: a callable class that adds each model's SID columns to a
batch of POI rows, with the same encoder (and so the same bits) as the command line.

Its columns are a documented contract, unlike the internal ``m<i>.*`` columns of :class:`~rqvae_ray.stages.encode.
EncodeModels`: per model, ``<prefix>.codes`` (list<int32>), and when asked ``<prefix>.vector``
(fixed_size_list<float32>[latent]) and ``<prefix>.sid`` (the ``<a_x><b_y><c_z>`` token string).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.core.encoder import Encoder, SparseRows, make_encoder
from rqvae_ray.core.formatting import sid_tokens
from rqvae_ray.core.rows import rows_from_table
from rqvae_ray.errors import DatasetError, InputDimensionError, OutputError
from rqvae_ray.stages.encode import INPUT_COLUMNS

CODES, VECTOR, SID = "codes", "vector", "sid"


@dataclass(frozen=True, kw_only=True)
class PrefixedModel:
    """One model of the stage: its frozen weights, the prefix of its columns, and where it came from (for messages)."""

    prefix: str
    source: str
    weights: ModelWeights


@dataclass(frozen=True, kw_only=True)
class SidColumnsConfig:
    """What :class:`SidColumns` adds: every model's codes, and its Vector and tokens when asked; ``drop_features``
    leaves out the feature columns (``indices``, ``values``, ``features``); ``use_gpu`` encodes on CUDA when there."""

    models: tuple[PrefixedModel, ...]
    vectors: bool = False
    tokens: bool = False
    drop_features: bool = False
    use_gpu: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise OutputError("the SID stage needs at least one model")
        prefixes = [model.prefix for model in self.models]
        empty = [model.source for model in self.models if not model.prefix]
        if empty:
            raise OutputError(f"{empty[0]}: its column prefix is empty; give it a name")
        twice = sorted({prefix for prefix in prefixes if prefixes.count(prefix) > 1})
        if twice:
            raise OutputError(f"two models would write the columns {twice[0]!r}.*; give each model its own prefix")

    def parts(self) -> tuple[str, ...]:
        """The column suffixes each model adds, in order."""
        return (CODES,) + ((VECTOR,) if self.vectors else ()) + ((SID,) if self.tokens else ())

    def output_columns(self) -> tuple[str, ...]:
        """The columns added to each batch, in order."""
        return tuple(f"{model.prefix}.{part}" for model in self.models for part in self.parts())


class _Encoding:
    """One model inside a stage instance: its encoder and its columns."""

    def __init__(self, model: PrefixedModel, use_gpu: bool) -> None:
        self.prefix = model.prefix
        self.source = model.source
        self.input_dim = model.weights.input_dim
        self.encoder: Encoder = make_encoder(model.weights, use_gpu)

    def columns(self, rows: SparseRows, dense_width: int | None, config: SidColumnsConfig) -> dict[str, pa.Array]:
        """This model's columns of ``rows`` (``dense_width``: the width of a dense ``features`` column, if any)."""
        if dense_width is not None and dense_width != self.input_dim:
            raise DatasetError("", f"the features have {dense_width} columns but {self.source} takes {self.input_dim}")
        try:
            codes, vectors = self.encoder.encode(rows)
        except InputDimensionError as exc:
            raise DatasetError("", f"{exc} of {self.source}; the features do not fit the model") from None
        columns = {CODES: _list_column(codes)}
        if config.vectors:
            columns[VECTOR] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
        if config.tokens:
            columns[SID] = sid_tokens(codes)
        return {f"{self.prefix}.{part}": column for part, column in columns.items()}


def _list_column(codes: np.ndarray) -> pa.Array:
    """list<int32> of the rows of the [n, levels] ``codes``."""
    offsets = pa.array(np.arange(len(codes) + 1, dtype=np.int32) * codes.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(codes.astype(np.int32).ravel()))


def _dense_width(batch: pa.Table) -> int | None:
    """The width of the batch's dense ``features`` column; ``None`` when the rows are sparse (``indices``)."""
    names = batch.column_names
    if "Pid" not in names:
        raise DatasetError("", f"the SID stage reads a 'Pid' column; the batch has {names}")
    if "indices" in names:
        return None
    if "features" not in names:
        raise DatasetError("", f"the SID stage reads 'indices' (sparse) or 'features' (dense); the batch has {names}")
    kind = batch.schema.field("features").type
    if not pa.types.is_fixed_size_list(kind):
        raise DatasetError("", f"the 'features' column must be a fixed-size list of floats, not {kind}")
    return kind.list_size


class SidColumns:
    """Callable class for ``Dataset.map_batches(batch_format="pyarrow")``: adds every model's SID columns.

    Reads ``Pid`` and the features (sparse ``indices``[/``values``] list columns, or a dense ``features``
    fixed-size list), keeps the input columns (less the features with ``drop_features``) and appends
    :meth:`SidColumnsConfig.output_columns`. The models are loaded once, when the instance is made.
    """

    def __init__(self, *, config: SidColumnsConfig) -> None:
        self.config = config
        self._models = [_Encoding(model, config.use_gpu) for model in config.models]

    def __call__(self, batch: pa.Table) -> pa.Table:
        dense_width = _dense_width(batch)
        rows = rows_from_table(batch)
        out = batch
        if self.config.drop_features:
            out = batch.drop_columns([name for name in INPUT_COLUMNS if name in batch.column_names])
        for model in self._models:
            for name, column in model.columns(rows, dense_width, self.config).items():
                if name in out.column_names:
                    raise DatasetError("", f"the batch already has a column {name!r}; give the model another prefix")
                out = out.append_column(name, column)
        return out
