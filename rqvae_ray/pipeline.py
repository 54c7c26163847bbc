"""The run: per dataset, load and check the inputs, plan the actor pools, stream the ordered blocks to the final
writer, and collect one result per model.

Datasets load in worker threads while the main thread starts (or joins) Ray; then each dataset's blocks stream
through its encoder pools (see :mod:`rqvae_ray.plan`) to the run's final writer actor (see :mod:`rqvae_ray.writer`),
which receives object references only: the driver never holds the output rows. A failure of one model or dataset
never stops the others.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.checkpoint import ModelWeights, load_checkpoint_bytes
from rqvae_ray.contract import OutputSpec
from rqvae_ray.errors import Cancelled, CheckpointError, RqvaeRayError, error_chain, reason_of
from rqvae_ray.existing_rows import ExistingRows
from rqvae_ray.feature_digest import rows_digests
from rqvae_ray.features import PoiFeatures, load_features
from rqvae_ray.keep_existing import PublishedFile, find_published, kept_entry
from rqvae_ray.model_ids import ModelSpec, group_by_dataset
from rqvae_ray.options import RunOptions
from rqvae_ray.outputs import (
    Existing,
    ManifestEntry,
    Provenance,
    ResumeState,
    check_existing,
    codebooks_filename,
    output_dir,
    remove_resume_state,
    remove_stale_partials,
    resume_key,
)
from rqvae_ray.plan import DatasetPlan, plan_dataset
from rqvae_ray.progress import Progress
from rqvae_ray.ray_cluster import ClusterShape, configure_data_context, reserve_actors, start_ray, wait_watching_cluster
from rqvae_ray.writer import ModelTarget, Published, Refused

# Blocks are at least this big, so that tiny batch sizes change only how often the UDF is called, not the number of
# objects the cluster has to track.
MIN_BLOCK_ROWS = 256
# Blocks handed to the writer but not yet written; bounds the driver's and the object store's backlog.
MAX_PENDING_WRITES = 16
# How long an interrupted run waits for its datasets to stop and drop their unfinished files.
CANCEL_WAIT_S = 5.0


@dataclass
class ModelResult:
    """Outcome of one model: ``encode_seconds`` is the time its encoder took (summed over its actors),
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

    @property
    def unique_sids(self) -> int:
        return int(self.quality.get("unique_sids", 0))

    @property
    def shared_pois(self) -> int:
        return int(self.quality.get("pois_in_collided_buckets", 0))


@dataclass(frozen=True)
class Ready:
    """A model whose checkpoint loaded, fits its dataset and has no up-to-date output; ``existing`` are the rows of
    its published file that its new file keeps (``--keep-existing``)."""

    spec: ModelSpec
    weights: ModelWeights
    provenance: Provenance
    existing: ExistingRows | None = None
    resume_key: str = ""  # its file's resume state is kept under this key ("" when none is: upload only, kept rows)
    resumed: ResumeState | None = None  # the state of an interrupted run this one continues

    @property
    def revision(self) -> str:
        return self.provenance.checkpoint_revision


@dataclass
class Loaded:
    """One dataset's inputs: the features, the models to run, the results already known (failed, skipped), and the
    digest of the features of every row (see :mod:`rqvae_ray.feature_digest`)."""

    features: PoiFeatures
    ready: list[Ready]
    results: dict[str, ModelResult]
    rows_sha256: str = ""

    @property
    def first_pid(self) -> int:
        """The first Pid any model needs encoded (N + 1 when every model keeps all its rows unverified)."""
        return min((_first_needed(r) for r in self.ready), default=1)


def _first_needed(ready: Ready) -> int:
    if ready.resumed is not None:
        return ready.resumed.rows + 1
    if ready.existing is not None and not ready.existing.verify:
        return ready.existing.rows + 1
    return 1


def run_models(specs: list[ModelSpec], options: RunOptions, progress: Progress | None = None) -> list[ModelResult]:
    """Run all models; datasets run concurrently. Returns results in input order.

    Ray's own processes must be started from the main thread (they are tied to the lifetime of the thread that
    spawns them), so the datasets and checkpoints load in worker threads meanwhile. On KeyboardInterrupt every
    dataset stops at its next block and drops its unfinished files, and the interrupt propagates; published outputs
    stay.
    """
    progress = progress or Progress()
    groups = group_by_dataset(specs)
    cancel = threading.Event()
    started: Future = Future()
    pool = ThreadPoolExecutor(max_workers=len(groups))
    futures = [
        pool.submit(_run_dataset, f"{org}/{dataset}", group, options, progress, len(groups), cancel, started)
        for (org, dataset), group in groups.items()
    ]
    writer = None
    try:
        try:
            cluster = start_ray(options.address)
            configure_data_context()
            writer = _start_writer(len(groups))
        except BaseException as exc:
            started.set_exception(exc)
            raise
        started.set_result(_Started(writer, cluster))
        wait_watching_cluster(futures)
        by_id = {r.model_id: r for f in futures for r in f.result()}
    except BaseException:
        cancel.set()
        # Each dataset stops at its next block and drops its unfinished files; a dataset stuck in a Ray call (the
        # cluster lost, say) is not waited for long.
        wait(futures, timeout=CANCEL_WAIT_S)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if writer is not None:
        import ray

        ray.kill(writer)
    return [by_id[s.model_id] for s in specs]


@dataclass(frozen=True)
class _Started:
    """What the main thread hands the dataset threads once Ray is up: the final writer actor and the cluster."""

    writer: object
    cluster: ClusterShape


def _start_writer(datasets: int):
    """The run's final writer actor: no GPU, and on the driver's node, where --out-dir is and where the Hugging Face
    token is configured (it is read there, never shipped through Ray)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rqvae_ray.writer import FinalWriter

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return (
        ray.remote(FinalWriter)
        .options(num_cpus=0, num_gpus=0, max_concurrency=datasets + 1, scheduling_strategy=here)
        .remote()
    )


def _run_dataset(
    repo: str,
    specs: list[ModelSpec],
    options: RunOptions,
    progress: Progress,
    datasets: int,
    cancel: threading.Event,
    started_ray: Future,
) -> list[ModelResult]:
    """Run every model of one dataset; never raises for model or dataset problems."""
    started = time.monotonic()
    try:
        loaded = load_dataset(repo, specs, options, progress)
    except RqvaeRayError as exc:
        return [ModelResult(s.model_id, s.dataset_repo, ok=False, error=str(exc)) for s in specs]
    results = loaded.results
    if loaded.ready:
        for result in _encode_and_write(loaded, options, progress, datasets, cancel, started_ray.result()):
            results[result.model_id] = result
    elapsed = time.monotonic() - started
    for result in results.values():
        result.dataset_seconds = elapsed
    return [results[s.model_id] for s in specs]


def load_dataset(repo: str, specs: list[ModelSpec], options: RunOptions, progress: Progress) -> Loaded:
    """Load and check the dataset and every checkpoint; decide which models have an up-to-date output already, and
    with ``--keep-existing`` which rows of each published file are kept."""
    org, dataset = repo.split("/", 1)
    features = load_features(options.hub.dataset_files(org, dataset))
    progress.note(f"{repo}: {features.num_pois} POIs x {features.dim} features (revision {features.revision})")
    folder = output_dir_of(options, repo)
    if folder is not None:
        remove_stale_partials(folder)
    results: dict[str, ModelResult] = {}
    ready: list[Ready] = []
    kept: dict[str, tuple[PublishedFile, ManifestEntry]] = {}
    for spec in specs:
        try:
            data, revision = options.hub.checkpoint(spec)
            weights = load_checkpoint_bytes(data, source="checkpoint")
            if weights.input_dim != features.dim:
                raise CheckpointError(
                    spec.model_id,
                    f"the model takes {weights.input_dim} input features but {repo} has "
                    f"{features.dim}; pair the model with the dataset it was trained on",
                )
        except RqvaeRayError as exc:
            results[spec.model_id] = ModelResult(spec.model_id, spec.dataset_repo, ok=False, error=str(exc))
            continue
        provenance = Provenance(weights.sha256, revision, features.sha256, features.revision)
        candidate = Ready(spec, weights, provenance)
        existing = _existing(candidate, options, repo)
        if existing.entry is not None:
            path = folder / existing.entry.file
            progress.note(f"{spec.model_id}: up to date ({path}); skipped, use --force to redo")
            results[spec.model_id] = ModelResult(
                spec.model_id,
                spec.dataset_repo,
                ok=True,
                skipped=True,
                rows=existing.entry.rows,
                path=str(path),
                sha256=existing.entry.sha256,
                quality=existing.entry.sid_stats,
            )
            continue
        filename = codebooks_filename(spec.name, options.output.fmt)
        if options.output.keep_existing:
            try:
                published = find_published(folder, options.hub, repo, options.base_folder, filename)
                if published is not None:
                    kept[spec.model_id] = (
                        published,
                        kept_entry(published, options.output, provenance, features.num_pois),
                    )
            except RqvaeRayError as exc:
                results[spec.model_id] = ModelResult(spec.model_id, spec.dataset_repo, ok=False, error=str(exc))
                continue
            if published is None:
                progress.note(f"{spec.model_id}: --keep-existing: no published {filename} yet; writing it whole")
        elif existing.stale:
            progress.note(f"{spec.model_id}: replacing {filename}: {existing.stale}")
        progress.note(f"{spec.model_id}: {weights.layout} checkpoint {weights.describe()} (revision {revision})")
        note = weights.sinkhorn_note()
        if note:
            progress.note(f"{spec.model_id}: note: {note}")
        ready.append(candidate)
    if not ready:
        return Loaded(features, ready, results)
    digests = rows_digests(features, {features.num_pois, *(entry.rows for _, entry in kept.values())})
    ready = [_keeping(r, kept.get(r.spec.model_id), digests, features.num_pois, progress) for r in ready]
    if folder is not None and not options.output.keep_existing:
        ready = _resuming(ready, folder, options, features.num_pois, progress)
    return Loaded(features, ready, results, digests[features.num_pois])


def _resuming(ready: list[Ready], folder: Path, options: RunOptions, num_pois: int, progress: Progress) -> list[Ready]:
    """Every model with the resume key of its file, continuing an interrupted run of the same inputs and options
    when every model of the dataset has one (from the fewest rows any has); other resume states are dropped."""
    keyed, states = [], []
    for r in ready:
        final = folder / codebooks_filename(r.spec.name, options.output.fmt)
        key = resume_key(r.spec.model_id, final.name, r.provenance, options.output, num_pois)
        state = ResumeState.read(final)
        if state is not None and state.owner_alive:  # another run is writing this file: not a state to resume
            states.append(None)
        elif state is not None and state.key == key and not options.force:
            states.append(state)
        else:
            remove_resume_state(final)
            states.append(None)
        keyed.append(dataclasses.replace(r, resume_key=key))
    if not all(state is not None and state.rows > 0 for state in states):
        return keyed
    rows = min(state.rows for state in states)
    progress.note(f"{ready[0].spec.dataset_repo}: resuming an interrupted run: {rows} POIs kept, from Pid {rows + 1}")
    return [
        dataclasses.replace(r, resumed=dataclasses.replace(s, rows=rows)) for r, s in zip(keyed, states, strict=True)
    ]


def _keeping(
    ready: Ready,
    kept: tuple[PublishedFile, ManifestEntry] | None,
    digests: dict[int, str],
    num_pois: int,
    progress: Progress,
) -> Ready:
    """``ready`` starting its file from the rows of its published file, verified when their features changed."""
    if kept is None:
        return ready
    published, entry = kept
    model, name = ready.spec.model_id, published.path.name
    verify = entry.features_rows_sha256 != digests[entry.rows]
    if verify:
        why = "were not recorded" if not entry.features_rows_sha256 else "changed since it was written"
        progress.note(
            f"{model}: the features of the {entry.rows} POIs in {name} {why}; encoding them again to check that "
            "each keeps its SID"
        )
    else:
        todo = f"encoding Pids {entry.rows + 1}..{num_pois}" if entry.rows < num_pois else "no new POI to encode"
        progress.note(f"{model}: keeping the {entry.rows} POIs of {name}; {todo}")
    return dataclasses.replace(ready, existing=ExistingRows(str(published.path), entry.rows, entry.sha256, verify))


def output_dir_of(options: RunOptions, repo: str) -> Path | None:
    """The local output folder of ``repo``'s files, or None when the run only uploads."""
    return None if options.out_dir is None else output_dir(Path(options.out_dir), repo, options.base_folder)


def _existing(ready: Ready, options: RunOptions, repo: str) -> Existing:
    folder = output_dir_of(options, repo)
    if folder is None or options.force:
        return Existing()
    filename = codebooks_filename(ready.spec.name, options.output.fmt)
    return check_existing(folder, filename, options.output, ready.provenance, repo)


def _commit_message(features: PoiFeatures, ready: list[Ready]) -> str:
    lines = [f"- {r.spec.model_id} @ {r.revision}" for r in ready]
    return (
        f"rqvae_ray {__version__}: semantic IDs of {len(ready)} model(s) for {features.repo}\n\n"
        f"Features: {features.repo} @ {features.revision}\nModels:\n" + "\n".join(lines)
    )


def build_dataset(
    features: PoiFeatures,
    ready: list[Ready],
    plan: DatasetPlan,
    spec: OutputSpec,
    batch_size: int,
    first_pid: int = 1,
):
    """The Ray Dataset of one plan: the POI rows from ``first_pid`` on in Pid order through the plan's pools
    (chained one after another when there are several); each output block holds ``Pid`` and every model's columns."""
    from ray.data import ActorPoolStrategy

    from rqvae_ray.encode_stage import EncodeModels
    from rqvae_ray.sources import poi_dataset

    ds = poi_dataset(features, max(batch_size, MIN_BLOCK_ROWS), first_pid)
    for number, pool in enumerate(plan.pools):
        models = [(ready[i].spec.model_id, i, ready[i].weights) for i in pool.models]
        ds = ds.map_batches(
            EncodeModels,
            fn_constructor_kwargs={
                "repo": features.repo,
                "models": models,
                "spec": spec,
                "keep_inputs": number < len(plan.pools) - 1,
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
    return ds


def _interrupted(error: BaseException) -> bool:
    """Whether a dataset failed from an interruption or a fault (its resume state is worth keeping), rather than for
    a reason of its inputs or options (ours, found by class along Ray's wrapping) that a rerun would meet again."""
    return not any(isinstance(e, RqvaeRayError) and not isinstance(e, Cancelled) for e in error_chain(error))


def model_targets(loaded: Loaded, spec: OutputSpec) -> list[ModelTarget]:
    """What the writer needs to know about each model to run of ``loaded`` (the ``i``-th model in slot ``i``)."""
    return [
        ModelTarget(
            r.spec.model_id,
            slot,
            codebooks_filename(r.spec.name, spec.fmt),
            r.weights.codebook_sizes,
            r.provenance,
            r.weights.sinkhorn_levels,
            loaded.rows_sha256,
            r.existing,
            r.weights.codebooks,
            r.resume_key,
            r.resumed.rows if r.resumed is not None else 0,
            r.resumed.encode_seconds if r.resumed is not None else 0.0,
        )
        for slot, r in enumerate(loaded.ready)
    ]


def _block_refs(ds) -> Iterator[tuple[object, tuple[int, int] | None]]:
    """The output blocks of ``ds`` in order, as object references (and the rows of each to take)."""
    for bundle in ds.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices, strict=True):
            yield entry.ref, (part.start_offset, part.end_offset) if part is not None else None


def _encode_and_write(
    loaded: Loaded,
    options: RunOptions,
    progress: Progress,
    datasets: int,
    cancel: threading.Event,
    started: _Started,
) -> list[ModelResult]:
    import ray

    writer, cluster = started.writer, started.cluster.now()  # a dataset planned later sees nodes added since
    features, ready = loaded.features, loaded.ready
    repo, pois, models, first_pid = features.repo, features.num_pois, len(ready), loaded.first_pid
    targets = model_targets(loaded, options.output)
    failure, commit = "", ""
    finished: list[Published | Refused] = []
    try:
        # Not waited for: the writes queue behind it, and an error here fails them.
        writer.open.remote(repo, targets, options.out_dir, options.base_folder, options.output, pois, first_pid)
        progress.dataset_started(repo, pois, models)
        if first_pid <= pois:
            rows = pois - first_pid + 1
            plan = plan_dataset([r.weights.nbytes for r in ready], rows, options.pools, cluster, datasets)
            progress.note(f"{repo}: {plan.describe()}")
            first = plan.pools[0]
            reserve_actors(first.num_cpus, first.num_gpus, plan.min_actors, options.actor_wait_s, cluster)
            ds = build_dataset(features, ready, plan, options.output, options.batch_size, first_pid)
            pending = []
            for seq, (ref, span) in enumerate(_block_refs(ds)):
                if cancel.is_set():
                    raise Cancelled(repo)
                pending.append(writer.write.remote(repo, seq, ref, span))
                while pending and (len(pending) > MAX_PENDING_WRITES or ray.wait(pending[:1], timeout=0)[0]):
                    progress.rows_written(repo, ray.get(pending.pop(0)), pois, models)
            ray.get(pending)
        finished = ray.get(writer.finish.remote(repo))
        progress.dataset_finished(repo, pois, models)
        done = {f.model_id for f in finished if isinstance(f, Published)}
        if options.upload and done:
            progress.note(f"{repo}: uploading the files of {len(done)} model(s) in one commit")
            message = _commit_message(features, [r for r in ready if r.spec.model_id in done])
            commit = ray.get(writer.upload.remote(repo, message, options.upload_retries, options.upload_backoff_s))
            progress.note(f"{repo}: uploaded as commit {commit}")
    # The dataset's boundary: whatever went wrong (ours, Ray's, or a bug) is these models' failure, found by class
    # along Ray's wrapping; the other datasets carry on.
    except Exception as exc:  # noqa: BLE001
        failure = reason_of(exc)
        try:
            ray.get(writer.abort.remote(repo, _interrupted(exc)))
        except ray.exceptions.RayError:
            pass
    by_model = {f.model_id: f for f in finished}
    results = []
    for item in ready:
        result = ModelResult(item.spec.model_id, item.spec.dataset_repo, ok=not failure, error=failure)
        done = by_model.get(item.spec.model_id)
        if isinstance(done, Refused):
            result.ok, result.error = False, done.reason
        elif done is not None:
            if item.existing is not None and item.existing.verify:
                progress.note(
                    f"{item.spec.model_id}: no POI of the {item.existing.rows} kept changed its SID; extended "
                    f"{done.entry.file}"
                )
            result.rows, result.sha256, result.quality = done.entry.rows, done.entry.sha256, done.entry.sid_stats
            result.encode_seconds = done.entry.encode_seconds
            result.path = done.path if options.out_dir is not None else ""
            result.commit = commit
        results.append(result)
    return results
