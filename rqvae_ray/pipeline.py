"""The Ray pipeline: per dataset, stream POI batches through one actor pool per model, then to the final writer.

The driver loads each dataset once and each checkpoint once, puts the frozen weights in the object store, chains one
``map_batches`` actor pool per model over the dataset, and hands the ordered output blocks (object references only,
never the rows) to a writer actor per dataset, which publishes the files and uploads them. Datasets run
concurrently; a failure of one model or dataset never stops the others.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.checkpoint import ModelWeights, load_checkpoint_bytes
from rqvae_ray.errors import (
    Cancelled,
    CheckpointError,
    OutputError,
    PoolStartTimeout,
    RayConnectionLost,
    RqvaeRayError,
    reason_of,
)
from rqvae_ray.features import PoiFeatures, load_features, to_ray_dataset
from rqvae_ray.model_ids import ModelSpec, group_by_dataset
from rqvae_ray.stores import HfHub, LocalHub
from rqvae_ray.writer import DatasetWriter, ModelTarget, file_sha256, output_dir, read_manifest

Progress = Callable[[str], None]

# Blocks are at least this big, so that tiny batch sizes change only how often the UDF is called, not the number of
# objects the cluster has to track.
MIN_BLOCK_ROWS = 256
# Blocks handed to the writer but not yet written; bounds the driver's and the object store's backlog.
MAX_PENDING_WRITES = 16


@dataclass
class RunOptions:
    """How to run: where inputs come from, where outputs go, and how big the actor pools are."""

    hub: LocalHub | HfHub
    out_dir: str | None = None
    upload: bool = False
    base_folder: str = "LLM Dataset"
    fmt: str = "csv"
    batch_size: int = 4096
    min_actors: int = 1
    max_actors: int = 1
    cpus_per_actor: float | None = None
    gpus_per_model: float | None = None
    actor_wait_s: float = 600.0
    force: bool = False
    dedup: bool = False
    sid_tokens: bool = False
    upload_retries: int = 5
    upload_backoff_s: float = 1.0


@dataclass
class ModelResult:
    """Outcome of one model."""

    model_id: str
    dataset: str
    ok: bool
    error: str = ""
    skipped: bool = False
    rows: int = 0
    seconds: float = 0.0
    path: str = ""
    sha256: str = ""
    commit: str = ""
    quality: dict = field(default_factory=dict)

    @property
    def unique_sids(self) -> int:
        return int(self.quality.get("unique_sids", 0))

    @property
    def shared_pois(self) -> int:
        return int(self.quality.get("pois_in_collided_buckets", 0))


def init_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a private local Ray."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # A private single-machine Ray has no reason to listen beyond loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        store = _local_object_store_bytes()
        ray.init(address="local", include_dashboard=False, log_to_driver=False, object_store_memory=store)
    import ray.data  # noqa: F401 - imported here, in the background, rather than on the critical path


def _local_object_store_bytes() -> int:
    """Object store size of a private local Ray: 256 MiB per CPU, at least 1 GiB, at most Ray's default (30 % of RAM).

    The blocks in flight need far less than Ray's default, and every page of the store that is touched once stays
    resident until Ray stops: with the default, the peak memory of a run grew with the number of POIs.
    """
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(0.3 * ram, max(1 << 30, (256 << 20) * (os.cpu_count() or 1))))


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
    # Ray Data restarts a dead encoder actor and retries its tasks (max_restarts=-1, max_task_retries=-1 are its
    # defaults for actor pools); a block that still fails must fail the dataset rather than be skipped.
    ctx.max_errored_blocks = 0
    # Every pool's actors start at once (see _reserve_actors); waiting here would start the pools one after another.
    ctx.wait_for_min_actors_s = -1
    # The driver reports rows written per dataset itself; Ray Data's per-operator log lines would drown it.
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _reserve_actors(num_cpus: float, num_gpus: float, actors: int, options: RunOptions) -> None:
    """Return once the cluster can hold all of a dataset's encoder actors at the same time.

    Ray Data starts its actor pools asynchronously here (``wait_for_min_actors_s = -1``), so that the pools' actors
    start together rather than one pool after another (a GPU actor spends seconds starting torch and CUDA); this check
    keeps the clear, bounded failure for pools that can never start. The placement group only probes: it is removed
    at once, before the actors ask for the same resources (on an autoscaling cluster, the nodes it brought up stay).
    """
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {name: amount for name, amount in (("CPU", num_cpus), ("GPU", num_gpus)) if amount}
    if not bundle:
        return
    group = placement_group([bundle] * actors)
    try:
        ready = group.wait(timeout_seconds=options.actor_wait_s)
    finally:
        remove_placement_group(group)
    if not ready:
        raise PoolStartTimeout(_pool_start_failure(num_cpus, num_gpus, options))


def _pool_start_failure(num_cpus: float, num_gpus: float, options: RunOptions) -> str:
    """Why no encoder actor started within --actor-wait-s: what each asked for, what the nodes offer, what to change."""
    import ray

    asked = {"CPU": num_cpus, "GPU": num_gpus}
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    wanted = " + ".join(f"{amount:g} {name}" for name, amount in asked.items() if amount)
    if any(all(node.get(name, 0.0) >= amount for name, amount in asked.items()) for node in nodes):
        why = "the nodes that could hold one are busy (other pools, jobs or actors hold their resources)"
    else:
        offers = [(node.get("CPU", 0.0), node.get("GPU", 0.0)) for node in nodes]
        cpus, gpus = max(offers, key=lambda offer: offer[::-1], default=(0.0, 0.0))
        why = f"no node has that much (the largest offers {cpus:g} CPU + {gpus:g} GPU)"
    return (
        f"no encoder actor started within --actor-wait-s {options.actor_wait_s:g}: each asks for {wanted} and {why}; "
        "lower --gpus-per-model, --cpus-per-actor or the actors per model, add nodes, or raise --actor-wait-s if "
        "nodes are still starting"
    )


@dataclass
class _Ready:
    """A model whose checkpoint loaded and fits its dataset."""

    spec: ModelSpec
    weights: ModelWeights
    revision: str

    def provenance(self, features: PoiFeatures) -> dict:
        return {
            "checkpoint_sha256": self.weights.sha256,
            "checkpoint_revision": self.revision,
            "features_sha256": features.sha256,
            "features_revision": features.revision,
        }


def _up_to_date(ready: _Ready, features: PoiFeatures, options: RunOptions, extension: str) -> ModelResult | None:
    """The earlier result of this model when its output exists, is intact and was made from the same inputs."""
    if options.out_dir is None or options.force:
        return None
    folder = output_dir(Path(options.out_dir), features.repo, options.base_folder)
    entry = read_manifest(folder)["models"].get(ready.spec.model_id)
    path = folder / f"codebooks-{ready.spec.name}.{extension}"
    wanted = {
        **ready.provenance(features),
        "format": options.fmt,
        "dedup": options.dedup,
        "sid_tokens": options.sid_tokens,
        "tool_version": __version__,
    }
    if not entry or any(entry.get(k) != v for k, v in wanted.items()) or not path.is_file():
        return None
    if file_sha256(path) != entry.get("sha256"):
        return None
    return ModelResult(
        ready.spec.model_id,
        ready.spec.dataset,
        ok=True,
        skipped=True,
        rows=int(entry.get("rows", 0)),
        path=str(path),
        sha256=entry["sha256"],
        quality=entry.get("sid_stats", {}),
    )


def run_dataset(
    repo: tuple[str, str],
    specs: list[ModelSpec],
    options: RunOptions,
    progress: Progress,
    actors_total: int,
    cancel: threading.Event,
    ray_ready: Future,
) -> list[ModelResult]:
    """Run every model of one dataset; never raises for model or dataset problems."""
    org, dataset = repo
    started = time.monotonic()
    try:
        features = load_features(options.hub.dataset_files(org, dataset))
    except RqvaeRayError as exc:
        return [ModelResult(s.model_id, s.dataset, ok=False, error=str(exc)) for s in specs]
    progress(f"{org}/{dataset}: {features.num_pois} POIs x {features.dim} features (revision {features.revision})")

    extension = "csv" if options.fmt == "csv" else "parquet"
    results: dict[str, ModelResult] = {}
    ready: list[_Ready] = []
    for spec in specs:
        try:
            data, revision = options.hub.checkpoint(spec)
            weights = load_checkpoint_bytes(data, source="checkpoint")
            if weights.input_dim != features.dim:
                raise CheckpointError(
                    spec.model_id,
                    f"the model takes {weights.input_dim} input features but {org}/{dataset} has "
                    f"{features.dim}; pair the model with the dataset it was trained on",
                )
        except RqvaeRayError as exc:
            results[spec.model_id] = ModelResult(spec.model_id, spec.dataset, ok=False, error=str(exc))
            continue
        candidate = _Ready(spec, weights, revision)
        earlier = _up_to_date(candidate, features, options, extension)
        if earlier is not None:
            progress(f"{spec.model_id}: up to date ({earlier.path}); skipped, use --force to redo")
            results[spec.model_id] = earlier
            continue
        progress(f"{spec.model_id}: {weights.layout} checkpoint {weights.describe()} (revision {revision})")
        ready.append(candidate)
    if ready:
        ray_ready.result()
        for result in _encode_and_write(features, ready, options, actors_total, progress, cancel):
            results[result.model_id] = result
    elapsed = time.monotonic() - started
    for result in results.values():
        result.seconds = result.seconds or elapsed
    return [results[s.model_id] for s in specs]


def _commit_message(features: PoiFeatures, ready: list[_Ready]) -> str:
    lines = [f"- {r.spec.model_id} @ {r.revision}" for r in ready]
    return (
        f"rqvae_ray {__version__}: semantic IDs of {len(ready)} model(s) for {features.repo}\n\n"
        f"Features: {features.repo} @ {features.revision}\nModels:\n" + "\n".join(lines)
    )


def _encode_and_write(
    features: PoiFeatures,
    ready: list[_Ready],
    options: RunOptions,
    actors_total: int,
    progress: Progress,
    cancel: threading.Event,
) -> list[ModelResult]:
    import ray
    from ray.data import ActorPoolStrategy
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rqvae_ray.encode_stage import EncodeBatches

    started = time.monotonic()
    num_cpus, num_gpus = _actor_resources(options, actors_total)
    ds = to_ray_dataset(features, max(options.batch_size, MIN_BLOCK_ROWS))
    extension = "csv" if options.fmt == "csv" else "parquet"
    targets = []
    for index, item in enumerate(ready):
        column = f"m{index}"
        ds = ds.map_batches(
            EncodeBatches,
            fn_constructor_kwargs={
                "weights_ref": [ray.put(item.weights)],
                "column": column,
                "fmt": options.fmt,
                "drop_inputs": index == len(ready) - 1,
                "dedup": options.dedup,
                "tokens": options.sid_tokens,
            },
            batch_size=options.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=options.min_actors, max_size=options.max_actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus or None,
        )
        filename = f"codebooks-{item.spec.name}.{extension}"
        targets.append(
            ModelTarget(item.spec.model_id, column, filename, item.weights.codebook_sizes, item.provenance(features))
        )

    # The final actor never holds a GPU, and lives on the driver's node: that is where --out-dir is, and where the
    # Hugging Face token is configured (it is read there, never shipped through Ray).
    writer = (
        ray.remote(DatasetWriter)
        .options(
            num_cpus=0,
            num_gpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
        )
        .remote(
            features.repo,
            targets,
            options.out_dir,
            options.base_folder,
            options.fmt,
            features.num_pois,
            options.dedup,
            options.sid_tokens,
        )
    )
    failure, commit = "", ""
    written: list[dict] = []
    try:
        _reserve_actors(num_cpus, num_gpus, len(ready) * options.min_actors, options)
        pending = []
        last_report = time.monotonic()
        for bundle in ds.iter_internal_ref_bundles():
            if cancel.is_set():
                raise Cancelled(features.repo)
            for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
                span = (part.start_offset, part.end_offset) if part is not None else None
                pending.append(writer.write.remote(entry.ref, span))
                if len(pending) > MAX_PENDING_WRITES:
                    done = ray.get(pending.pop(0))
                    if time.monotonic() - last_report > 5:
                        progress(f"{features.repo}: {done}/{features.num_pois} POIs written for {len(ready)} models")
                        last_report = time.monotonic()
        ray.get(pending)
        written = ray.get(writer.finish.remote())
        progress(f"{features.repo}: {features.num_pois} POIs written for {len(ready)} models")
        if options.upload:
            progress(f"{features.repo}: uploading {len(written)} file(s) in one commit")
            commit = ray.get(
                writer.upload.remote(_commit_message(features, ready), options.upload_retries, options.upload_backoff_s)
            )
            progress(f"{features.repo}: uploaded as commit {commit}")
    except (RqvaeRayError, ray.exceptions.RayError) as exc:
        failure = reason_of(exc)
        try:
            ray.get(writer.abort.remote())
        except ray.exceptions.RayError:
            pass
    finally:
        ray.kill(writer)
    seconds = time.monotonic() - started
    by_model = {w["model_id"]: w for w in written}
    results = []
    for item in ready:
        result = ModelResult(item.spec.model_id, item.spec.dataset, ok=not failure, error=failure, seconds=seconds)
        info = by_model.get(item.spec.model_id)
        if info is not None:
            result.rows, result.sha256, result.quality = info["rows"], info["sha256"], info["sid_stats"]
            result.path = info["path"] if options.out_dir is not None else ""
            result.commit = commit
        results.append(result)
    return results


def check_out_dir(out_dir: str) -> None:
    """Fail fast (before any inference) when the output directory cannot be written."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rqvae_ray-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output directory {out_dir} is not writable ({exc.strerror}); choose another --out-dir", path=out_dir
        ) from None


def _gcs_reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _wait_watching_ray(futures: list[Future], every_s: float = 2.0, misses: int = 3) -> None:
    """Wait for the dataset threads while checking that Ray's GCS still answers.

    Without this, a lost cluster leaves the driver blocked until Ray's own core worker kills it a minute later with
    a message of its own; here the run stops with one clear line instead.
    """
    import ray

    address = ray.get_runtime_context().gcs_address
    missed = 0
    while wait(futures, timeout=every_s).not_done:
        missed = 0 if _gcs_reachable(address) else missed + 1
        if missed >= misses:
            raise RayConnectionLost(address)


def run_models(
    specs: list[ModelSpec], options: RunOptions, progress: Progress = print, address: str | None = None
) -> list[ModelResult]:
    """Run all models; datasets run concurrently. Returns results in input order.

    Datasets and checkpoints load in worker threads while this thread starts (or joins) Ray: Ray's own processes
    must be started from the main thread, since they are tied to the lifetime of the thread that spawns them.
    On KeyboardInterrupt every dataset stops at its next block, its staged files are dropped, and the interrupt
    propagates; outputs already published stay.
    """
    groups = group_by_dataset(specs)
    actors_total = max(1, len(specs) * options.max_actors)
    cancel = threading.Event()
    ray_ready: Future = Future()
    pool = ThreadPoolExecutor(max_workers=len(groups))
    futures = [
        pool.submit(run_dataset, repo, group, options, progress, actors_total, cancel, ray_ready)
        for repo, group in groups.items()
    ]
    try:
        try:
            init_ray(address)
            _configure_data_context(options)
        except BaseException as exc:
            ray_ready.set_exception(exc)
            raise
        ray_ready.set_result(None)
        _wait_watching_ray(futures)
        by_id = {r.model_id: r for f in futures for r in f.result()}
    except BaseException:
        cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [by_id[s.model_id] for s in specs]
