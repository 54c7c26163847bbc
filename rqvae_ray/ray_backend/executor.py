"""The Ray executor: each dataset's blocks stream from a Ray Data datasource through its encoder actor pools (see
:mod:`rqvae_ray.ray_backend.plan`) to its writer actors (see :mod:`rqvae_ray.ray_backend.writer_actor`), which
receive object references only: the driver never holds the output rows.

Ray's own processes are tied to the thread that starts them, so Ray starts (or is joined) from the main thread while
the datasets load in worker threads.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.errors import RqvaeRayError, WriterDied, reason_of
from rqvae_ray.inputs.features import PoiFeatures
from rqvae_ray.outputs.layout import written_filenames
from rqvae_ray.outputs.manifest import ManifestEntry
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
from rqvae_ray.outputs.writer import commit_dataset, repo_files
from rqvae_ray.pipeline.executor import DatasetStream, Executor
from rqvae_ray.pipeline.jobs import Loaded, stage_models
from rqvae_ray.pipeline.options import RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.ray_backend import compat
from rqvae_ray.ray_backend.cluster import (
    BLOCK_BYTES,
    CSV_BLOCK_BYTES,
    ClusterShape,
    configure_data_context,
    reserve_actors,
    start_ray,
    wait_watching_cluster,
)
from rqvae_ray.ray_backend.plan import CPUS_PER_WRITER, DatasetPlan, WriterPlan, plan_dataset, plan_writers
from rqvae_ray.ray_backend.writer_actor import WriterActor, WriterKey
from rqvae_ray.stages.encode import EncodeModels

# Blocks are at least this big, so that tiny batch sizes change only how often the UDF is called, not the number of
# objects the cluster has to track.
MIN_BLOCK_ROWS = 256
# Bytes of blocks handed to the writer but not yet written (in blocks, at least 2): the object store's backlog, which
# Ray Data does not count (16 of CSV's 16 MiB blocks would take a quarter of a private Ray's 1 GiB store on 2 CPUs).
PENDING_WRITE_BYTES = 64 << 20


class RayExecutor(Executor):
    """Runs on the cluster at ``address`` (or ``RAY_ADDRESS``), else on a private local Ray; writes ``fmt``."""

    def __init__(self, address: str | None, fmt: OutputFormat) -> None:
        self.address = address
        self.block_bytes = CSV_BLOCK_BYTES if fmt is OutputFormat.CSV else BLOCK_BYTES
        self.cluster: ClusterShape | None = None
        self.writers: Writers | None = None

    def prepare(self) -> None:
        # Beside the loading threads (torch's import), Ray's import took 1 s instead of 0.3 s, and ray.init waited.
        import ray  # noqa: F401

    def start(self) -> None:
        self.cluster = start_ray(self.address)
        configure_data_context(self.block_bytes)
        self.writers = Writers(self.cluster)

    def dataset(self, datasets: int) -> DatasetStream:
        # A dataset planned later sees the nodes added since.
        return _RayStream(self.writers, self.cluster.now(), datasets, max(2, PENDING_WRITE_BYTES // self.block_bytes))

    def wait(self, futures: list[Future]) -> None:
        wait_watching_cluster(futures)

    def close(self) -> None:
        self.writers.close()

    def abandon(self) -> None:
        """Nothing: the writers end with the Ray that holds them (they may be serving a dataset still, or be lost)."""


class Writers:
    """The run's writer actors. Those on the driver's node (where ``--out-dir`` is) are shared by the datasets: one per
    :data:`~rqvae_ray.ray_backend.plan.CPUS_PER_WRITER` CPUs of the node, started as the datasets ask for them and
    handed out in turn beyond that. An upload-only run on a cluster starts its own on the nodes in turn, except
    that one whose node has no Hugging Face token is replaced by one on the driver's node, whose files the driver
    commits (the token is read where it is configured, never sent through Ray)."""

    def __init__(self, cluster: ClusterShape) -> None:
        self.cap = max(1, math.floor(cluster.driver_cpus / CPUS_PER_WRITER))
        self.here: list = []
        self.turn = 0
        self.spread: list = []
        self.spread_turn = 0
        self.lock = threading.Lock()

    def get(self, count: int, anywhere: bool) -> list:
        """``count`` writer actors for one dataset (the same actor may serve several datasets)."""
        import ray

        if not anywhere:
            with self.lock:
                return [self._next_here() for _ in range(count)]
        here = ray.get_runtime_context().get_node_id()
        # The other nodes first, then the driver's (whose disk the datasets written into --out-dir share).
        alive = sorted((node["NodeID"] for node in ray.nodes() if node.get("Alive")), key=lambda node: node == here)
        with self.lock:
            nodes = [self._next_node(alive or [here]) for _ in range(count)]
        # Pinned, not soft: a soft affinity let Ray place two writers on one node of a simulated cluster (as SPREAD
        # had); a node gone since the listing fails its writer's first call, and a driver-node writer takes over.
        writers = [_start_writer(node) for node in nodes]
        answers = [writer.token_here.remote() for writer in writers]
        with self.lock:
            for index, answer in enumerate(answers):
                if _token_there(answer):
                    self.spread.append(writers[index])
                else:
                    ray.kill(writers[index])
                    writers[index] = self._next_here()
        return writers

    def _next_node(self, nodes: list[str]) -> str:
        """The next of ``nodes`` in turn, for a writer that may run anywhere."""
        node = nodes[self.spread_turn % len(nodes)]
        self.spread_turn += 1
        return node

    def _next_here(self):
        if self.turn == len(self.here) and len(self.here) < self.cap:
            self.here.append(_start_writer())
        writer = self.here[self.turn % len(self.here)]
        self.turn += 1
        return writer

    def close(self) -> None:
        import ray

        for writer in [*self.here, *self.spread]:
            ray.kill(writer)
        self.here, self.spread = [], []


def _token_there(answer) -> bool:
    """Whether a writer placed on another node answered that a Hugging Face token is configured there (False when it
    could not start: its node went away)."""
    import ray

    try:
        return bool(ray.get(answer))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError):
        return False


def _start_writer(node: str | None = None):
    """A writer actor pinned to ``node`` (default: the driver's); no GPU and no CPU reserved: writers must never keep
    encoder actors from starting."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    strategy = NodeAffinitySchedulingStrategy(node or ray.get_runtime_context().get_node_id(), soft=False)
    options = {"num_cpus": 0, "num_gpus": 0, "max_concurrency": 1, "scheduling_strategy": strategy}
    return ray.remote(WriterActor).options(**options).remote()


class _RayStream(DatasetStream):
    """One dataset on Ray: its blocks go to each of its writers, which write the files of some of its models (see
    :func:`~rqvae_ray.ray_backend.plan.plan_writers`); when uploading, the driver makes the dataset's one commit, with
    the files of writers on other nodes pre-uploaded there."""

    def __init__(self, writers: Writers, cluster: ClusterShape, datasets: int, max_pending: int) -> None:
        self.pool = writers
        self.max_pending = max_pending
        self.cluster = cluster
        self.datasets = datasets
        self.output: DatasetOutput | None = None
        self.plan: WriterPlan | None = None
        self.writers: list[tuple[object, WriterKey]] = []  # (actor, key) per part of the plan
        self.published: list[list[ManifestEntry]] = []  # each part's published files

    def open(self, output: DatasetOutput) -> None:
        self.output = output
        names = [{target.filename, *written_filenames(target.filename)} for target in output.targets]
        rows = (output.num_pois - output.first_pid + 1) * len(output.targets)
        self.plan = plan_writers(names, rows, self.cluster, self.datasets, local=output.folder is not None)
        actors = self.pool.get(len(self.plan.parts), self.plan.anywhere)
        self.writers = [(actor, WriterKey(output.repo, number)) for number, actor in enumerate(actors)]
        for (actor, key), part in zip(self.writers, self.plan.parts, strict=True):
            # Not waited for: the writes queue behind it, and an error here fails them.
            actor.open.remote(key, dataclasses.replace(output, targets=tuple(output.targets[i] for i in part)))

    def _call(self, method: str, *args) -> list:
        """Call ``method`` of every part's writer, side by side: the object references."""
        return [getattr(actor, method).remote(key, *args) for actor, key in self.writers]

    def stream(self, loaded: Loaded, options: RunOptions, progress: Progress) -> Iterator[int]:
        ready = loaded.ready
        rows = loaded.features.num_pois - loaded.first_pid + 1
        plan = plan_dataset([r.weights.nbytes for r in ready], rows, options.pools, self.cluster, self.datasets)
        progress.note(f"{loaded.repo}: {plan.describe()}; {self.plan.describe()}")
        first = plan.pools[0]
        reserve_actors(first.num_cpus, first.num_gpus, plan.min_actors, options.actor_wait_s, self.cluster)
        ds = build_dataset(loaded, plan, options)
        pending: deque = deque()
        for ref, span in compat.block_refs(ds):
            pending.append(self._call("write", ref, span))
            while pending and (len(pending) > self.max_pending or _all_ready(pending[0])):
                yield min(self._get(pending.popleft()))
        while pending:
            yield min(self._get(pending.popleft()))

    def finish(self) -> list[Published | Refused]:
        """Every writer's results: when some writers fail while others publish, the failed ones' models are refused
        with the reason; a failure of every writer is the dataset's."""
        results: list[Published | Refused] = []
        failures: list[RqvaeRayError] = []
        self.published = []
        for ref, part in zip(self._call("finish"), self.plan.parts, strict=True):
            try:
                outcome = self._get(ref)
            except RqvaeRayError as exc:
                failures.append(exc)
                outcome = [Refused(self.output.targets[i].model_id, reason_of(exc)) for i in part]
            self.published.append([result.entry for result in outcome if isinstance(result, Published)])
            results.extend(outcome)
        if failures and len(failures) == len(self.writers):
            raise failures[0]
        return results

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """One commit of every writer's files: the driver reads those written on its node and the other writers
        pre-upload theirs."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        files, elsewhere = [], []
        for (actor, key), entries, (node, folder) in zip(
            self.writers, self.published, self._get(self._call("where")), strict=True
        ):
            if node == here:
                files.extend(repo_files(Path(folder), self.output.base_folder, entries))
            elif entries:
                elsewhere.append(actor.preupload.remote(key, retries, backoff_s))
        preuploaded = self._get(elsewhere)
        entries = [entry for part in self.published for entry in part]
        base = self.output.base_folder
        oid = commit_dataset(self.output.repo, base, entries, message, retries, backoff_s, files, preuploaded)
        self._get(self._call("release"))
        return oid

    def _get(self, refs):
        """The result of calls to the writers; a writer's death is :class:`WriterDied` (resumable), not Ray's own
        error."""
        import ray

        try:
            return ray.get(refs)
        except ray.exceptions.RayActorError as exc:
            raise WriterDied(self.output.repo, _death_cause(exc)) from exc

    def abort(self, keep_resume: bool) -> None:
        import ray

        for ref in self._call("abort", keep_resume):
            try:
                ray.get(ref)
            except ray.exceptions.RayError:
                pass


def _all_ready(refs: list) -> bool:
    import ray

    return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs)


def _death_cause(error) -> str:
    """Why an actor died, in a few words, from the class and attributes of Ray's error."""
    import ray

    if isinstance(error, ray.exceptions.ActorUnavailableError):
        return "it stopped answering"
    if error.preempted:
        return "its node was preempted"
    if error.actor_init_failed:
        return "it failed to start"
    return "it was killed or crashed"


def build_dataset(loaded: Loaded, plan: DatasetPlan, options: RunOptions):
    """The Ray Dataset of one plan: the POI rows from ``loaded.first_pid`` on in Pid order through the plan's pools
    (chained one after another when there are several); each output block holds ``Pid`` and every model's columns."""
    from ray.data import ActorPoolStrategy

    from rqvae_ray.ray_backend.datasource import poi_dataset

    features: PoiFeatures = loaded.features
    ds = poi_dataset(features, max(options.batch_size, MIN_BLOCK_ROWS), loaded.first_pid)
    for number, pool in enumerate(plan.pools):
        ds = ds.map_batches(
            EncodeModels,
            fn_constructor_kwargs={
                "repo": features.repo,
                "models": stage_models(loaded, pool.models),
                "spec": options.output,
                "keep_inputs": number < len(plan.pools) - 1,
                "use_gpu": pool.num_gpus > 0,
                "encoder_factory": options.encoder_factory,
            },
            batch_size=options.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus or None,
        )
    return ds
