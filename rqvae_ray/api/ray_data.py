"""Our encoder as a stage of your own Ray Data pipeline, shaped like Ray's processors (``ray.data.llm``): a config in,
a stage out, and ``stage(ds)`` is ``ds.map_batches(**stage.map_batches_kwargs)``.

The checkpoints are loaded and checked when the stage is built, so that a bad model fails at once in the driver; the
frozen weights travel to the actors in the constructor keywords.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rqvae_ray.core.checkpoint import load_checkpoint_bytes, load_checkpoint_file
from rqvae_ray.errors import OutputError
from rqvae_ray.inputs.model_ids import parse_model_id
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, HfHub, LocalHub
from rqvae_ray.ray_backend.stage_strategy import actor_pool_strategy
from rqvae_ray.stages.sid_stage import PrefixedModel, SidColumns, SidColumnsConfig

CHECKPOINT_SUFFIXES = (".pt", ".pth")


@dataclass(frozen=True, kw_only=True)
class SidStageConfig:
    """What the stage encodes and how Ray sizes its actor pool.

    ``models``: model IDs (read from ``hub_dir``, else the Hugging Face Hub at ``revision``) or checkpoint files
    (a ``Path``, a string ending in ``.pt``/``.pth``, or an existing file). ``prefixes``: one column prefix per model
    (default: the model's name; for a file, its name, or its folder's for a hub's ``rqvae_best.pt``). ``vectors`` and
    ``tokens`` add ``<prefix>.vector`` and ``<prefix>.sid``; ``drop_features`` leaves out the feature columns.
    ``actors``: a fixed number, or ``(min, max)`` for an autoscaling pool.
    """

    models: Sequence[str | os.PathLike[str]]
    prefixes: Sequence[str] | None = None
    hub_dir: str | os.PathLike[str] | None = None
    revision: str | None = None
    vectors: bool = False
    tokens: bool = False
    drop_features: bool = False
    actors: int | tuple[int, int] = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if isinstance(self.models, str | os.PathLike):
            raise OutputError("models is a sequence of model IDs or checkpoint paths; give (model,) for one model")
        if not self.models:
            raise OutputError("the SID stage needs at least one model; give model IDs or checkpoint paths")
        if self.prefixes is not None and len(self.prefixes) != len(self.models):
            raise OutputError(f"{len(self.prefixes)} prefixes for {len(self.models)} models; give one per model")
        low, high = self.actor_range
        if low < 1 or low > high:
            raise OutputError(f"actors {self.actors!r}: give a count of at least 1, or (min, max) with min <= max")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise OutputError("cpus_per_actor and gpus_per_actor may not be negative")
        if self.batch_size < 1:
            raise OutputError(f"batch_size {self.batch_size}: give at least 1 row per batch")

    @property
    def actor_range(self) -> tuple[int, int]:
        """The pool's (min, max) actors."""
        if isinstance(self.actors, int):
            return self.actors, self.actors
        if len(self.actors) != 2:
            raise OutputError(f"actors {self.actors!r}: give a count, or (min, max)")
        return int(self.actors[0]), int(self.actors[1])


@dataclass(frozen=True, kw_only=True)
class SidStage:
    """A built stage: apply it with ``stage(ds)``, or pass ``**stage.map_batches_kwargs`` to ``Dataset.map_batches``."""

    udf_config: SidColumnsConfig
    batch_size: int
    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float

    @property
    def output_columns(self) -> tuple[str, ...]:
        """The columns the stage adds to each batch."""
        return self.udf_config.output_columns()

    @property
    def map_batches_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``Dataset.map_batches`` that run this stage."""
        return {
            "fn": SidColumns,
            "fn_constructor_kwargs": {"config": self.udf_config},
            "batch_size": self.batch_size,
            "batch_format": "pyarrow",
            "compute": actor_pool_strategy(self.min_actors, self.max_actors),
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
        }

    def __call__(self, ds):
        """``ds`` with every model's SID columns added (lazily, as any ``map_batches``)."""
        return ds.map_batches(**self.map_batches_kwargs)


def build_sid_stage(config: SidStageConfig) -> SidStage:
    """Load and check every model of ``config`` and return the stage; a bad model raises its one-line error here."""
    models = [_load(model, config) for model in config.models]
    if config.prefixes is not None:
        models = [replace(model, prefix=prefix) for model, prefix in zip(models, config.prefixes, strict=True)]
    dims = sorted({model.weights.input_dim for model in models})
    if len(dims) > 1:
        raise OutputError(f"the models take different numbers of input features {dims}; build one stage for each")
    udf_config = SidColumnsConfig(
        models=tuple(models),
        vectors=config.vectors,
        tokens=config.tokens,
        drop_features=config.drop_features,
        use_gpu=config.gpus_per_actor > 0,
    )
    low, high = config.actor_range
    return SidStage(
        udf_config=udf_config,
        batch_size=config.batch_size,
        min_actors=low,
        max_actors=high,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )


def _is_checkpoint_file(model: str | os.PathLike[str]) -> bool:
    if not isinstance(model, str):
        return True
    return model.endswith(CHECKPOINT_SUFFIXES) or Path(model).is_file()


def _hub(config: SidStageConfig) -> LocalHub | HfHub:
    """Where model IDs are read: ``hub_dir``, else the Hugging Face Hub (only model IDs need one)."""
    return LocalHub(config.hub_dir) if config.hub_dir is not None else HfHub(config.revision)


def _load(model: str | os.PathLike[str], config: SidStageConfig) -> PrefixedModel:
    """One model's weights and default prefix, from a checkpoint file or a model ID (read from the config's hub)."""
    if _is_checkpoint_file(model):
        path = Path(model)
        prefix = path.parent.name if path.name == CHECKPOINT_FILE and path.parent.name else path.stem
        return PrefixedModel(prefix=prefix, source=str(model), weights=load_checkpoint_file(path))
    spec = parse_model_id(model)
    data, _revision = _hub(config).checkpoint(spec)
    weights = load_checkpoint_bytes(data, source=spec.model_id)
    return PrefixedModel(prefix=spec.name, source=spec.model_id, weights=weights)
