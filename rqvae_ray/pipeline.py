"""The Ray pipeline: per dataset, stream POI batches through one actor pool per model, then to the final writer.

The driver parses nothing here (see :mod:`rqvae_ray.model_ids`); it loads each dataset once and each checkpoint once,
puts the frozen weights in the object store, chains one ``map_batches`` actor pool per model over the dataset, and
hands the ordered output blocks (object references only, never the rows) to a writer actor per dataset.
Datasets run concurrently; a failure of one model or dataset never stops the others.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rqvae_ray.checkpoint import CheckpointError, ModelWeights, load_checkpoint_bytes
from rqvae_ray.features import DatasetError, PoiFeatures, load_features, to_ray_dataset
from rqvae_ray.model_ids import ModelSpec, group_by_dataset
from rqvae_ray.stores import HfHub, LocalHub, ResourceNotFoundError
from rqvae_ray.writer import DatasetWriter, ModelTarget, OutputError

Progress = Callable[[str], None]

# Blocks are at least this big, so that tiny batch sizes change only how often the UDF is called, not the number of
# objects the cluster has to track.
MIN_BLOCK_ROWS = 256


@dataclass
class RunOptions:
    """How to run: where inputs come from, where outputs go, and how big the actor pools are."""

    hub: LocalHub | HfHub
    out_dir: str
    base_folder: str = "LLM Dataset"
    fmt: str = "csv"
    batch_size: int = 1024
    min_actors: int = 1
    max_actors: int = 1
    cpus_per_actor: float | None = None
    gpus_per_model: float | None = None
    actor_wait_s: float = 600.0


@dataclass
class ModelResult:
    """Outcome of one model."""

    model_id: str
    dataset: str
    ok: bool
    error: str = ""
    rows: int = 0
    seconds: float = 0.0
    path: str = ""
    sha256: str = ""
    quality: dict = field(default_factory=dict)
    checkpoint_sha256: str = ""
    checkpoint_revision: str = ""
    features_sha256: str = ""
    features_revision: str = ""

    @property
    def unique_sids(self) -> int:
        return int(self.quality.get("unique_sids", 0))

    @property
    def shared_pois(self) -> int:
        return int(self.quality.get("pois_in_collided_buckets", 0))


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)


def _actor_resources(options: RunOptions, total_actors: int) -> tuple[float, float]:
    """(num_cpus, num_gpus) per encoder actor; CPU shares leave half the cluster to reading and writing."""
    import ray

    resources = ray.cluster_resources()
    gpus = options.gpus_per_model
    if gpus is None:
        cluster_gpus = float(resources.get("GPU", 0.0))
        gpus = min(1.0, cluster_gpus / total_actors) if cluster_gpus else 0.0
    cpus = options.cpus_per_actor
    if cpus is None:
        cluster_cpus = float(resources.get("CPU", 1.0))
        cpus = max(0.01, min(1.0, int(50 * cluster_cpus / total_actors) / 100))
    return cpus, gpus


def _configure_data_context(options: RunOptions) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.wait_for_min_actors_s = options.actor_wait_s
    # The driver reports rows written per dataset itself; Ray Data's per-operator log lines would drown it.
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _column(index: int) -> str:
    return f"m{index}"


def run_dataset(
    repo: tuple[str, str], specs: list[ModelSpec], options: RunOptions, progress: Progress, actors_total: int
) -> list[ModelResult]:
    """Run every model of one dataset; never raises for model or dataset problems."""
    org, dataset = repo
    started = time.monotonic()
    try:
        files = options.hub.dataset_files(org, dataset)
        features = load_features(files)
    except (ResourceNotFoundError, DatasetError) as exc:
        return [ModelResult(s.model_id, s.dataset, ok=False, error=str(exc)) for s in specs]
    progress(f"{org}/{dataset}: {features.num_pois} POIs x {features.dim} features (revision {features.revision})")

    results: dict[str, ModelResult] = {}
    ready: list[tuple[ModelSpec, ModelWeights, str]] = []
    for spec in specs:
        try:
            data, revision = options.hub.checkpoint(spec)
            weights = load_checkpoint_bytes(data, source=spec.model_id)
            if weights.input_dim != features.dim:
                raise CheckpointError(
                    f"{spec.model_id}: the model takes {weights.input_dim} input features but {org}/{dataset} has "
                    f"{features.dim}; pair the model with the dataset it was trained on"
                )
        except (ResourceNotFoundError, CheckpointError) as exc:
            results[spec.model_id] = ModelResult(spec.model_id, spec.dataset, ok=False, error=str(exc))
            continue
        progress(f"{spec.model_id}: {weights.layout} checkpoint {weights.describe()}")
        ready.append((spec, weights, revision))
    if ready:
        for result in _encode_and_write(features, ready, options, actors_total, progress):
            results[result.model_id] = result
    elapsed = time.monotonic() - started
    for result in results.values():
        result.seconds = result.seconds or elapsed
        result.features_sha256, result.features_revision = features.sha256, features.revision
    return [results[s.model_id] for s in specs]


def _encode_and_write(
    features: PoiFeatures,
    ready: list[tuple[ModelSpec, ModelWeights, str]],
    options: RunOptions,
    actors_total: int,
    progress: Progress,
) -> list[ModelResult]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rqvae_ray.encode_stage import EncodeBatches

    started = time.monotonic()
    num_cpus, num_gpus = _actor_resources(options, actors_total)
    ds = to_ray_dataset(features, max(options.batch_size, MIN_BLOCK_ROWS))
    extension = "csv" if options.fmt == "csv" else "parquet"
    targets = []
    for index, (spec, weights, _) in enumerate(ready):
        column = _column(index)
        ds = ds.map_batches(
            EncodeBatches,
            fn_constructor_kwargs={
                "weights_ref": [ray.put(weights)],
                "column": column,
                "fmt": options.fmt,
                "drop_inputs": index == len(ready) - 1,
            },
            batch_size=options.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            concurrency=(options.min_actors, options.max_actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
            max_restarts=-1,
            max_task_retries=-1,
        )
        filename = f"codebooks-{spec.name}.{extension}"
        targets.append(ModelTarget(spec.model_id, column, filename, weights.codebook_sizes))

    writer = (
        ray.remote(DatasetWriter)
        .options(
            num_cpus=0,
            num_gpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        )
        .remote(features.repo, targets, options.out_dir, options.base_folder, options.fmt)
    )
    failure = ""
    written: list[dict] = []
    try:
        pending = []
        last_report = time.monotonic()
        for bundle in ds.iter_internal_ref_bundles():
            for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
                span = (part.start_offset, part.end_offset) if part is not None else None
                pending.append(writer.write.remote(entry.ref, span))
                if len(pending) > 16:
                    done = ray.get(pending.pop(0))
                    if time.monotonic() - last_report > 5:
                        progress(f"{features.repo}: {done}/{features.num_pois} POIs written for {len(ready)} models")
                        last_report = time.monotonic()
        ray.get(pending)
        written = ray.get(writer.finish.remote(features.num_pois))
    except (OutputError, ray.exceptions.RayError, ValueError, RuntimeError) as exc:
        failure = _one_line(exc)
        try:
            ray.get(writer.abort.remote())
        except ray.exceptions.RayError:
            pass
    finally:
        ray.kill(writer)
    seconds = time.monotonic() - started
    by_model = {w["model_id"]: w for w in written}
    results = []
    for spec, weights, revision in ready:
        base = ModelResult(
            spec.model_id,
            spec.dataset,
            ok=not failure,
            error=failure,
            seconds=seconds,
            checkpoint_sha256=weights.sha256,
            checkpoint_revision=revision,
        )
        if not failure:
            info = by_model[spec.model_id]
            base.rows, base.path, base.sha256, base.quality = (
                info["rows"],
                info["path"],
                info["sha256"],
                info["quality"],
            )
        results.append(base)
    return results


def _one_line(exc: BaseException) -> str:
    cause = exc
    if hasattr(exc, "cause") and exc.cause is not None:
        cause = exc.cause
    text = str(cause).strip().splitlines()
    for line in reversed(text):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:400]
    return type(cause).__name__


def run_models(specs: list[ModelSpec], options: RunOptions, progress: Progress = print) -> list[ModelResult]:
    """Run all models (Ray must be initialised); datasets run concurrently. Returns results in input order."""
    _configure_data_context(options)
    groups = group_by_dataset(specs)
    actors_total = max(1, len(specs) * options.max_actors)
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        futures = [
            pool.submit(run_dataset, repo, group, options, progress, actors_total) for repo, group in groups.items()
        ]
        by_id = {r.model_id: r for f in futures for r in f.result()}
    return [by_id[s.model_id] for s in specs]
