"""The Ray executor: each dataset's blocks stream from a Ray Data datasource through its encoder actor pools (see
:mod:`rqvae_ray.ray_backend.plan`) to the run's writer actor (see :mod:`rqvae_ray.ray_backend.writer_actor`), which
receives object references only: the driver never holds the output rows.

Ray's own processes are tied to the thread that starts them, so Ray starts (or is joined) from the main thread while
the datasets load in worker threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.errors import WriterDied
from rqvae_ray.inputs.features import PoiFeatures
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused
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
from rqvae_ray.ray_backend.plan import DatasetPlan, plan_dataset
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
        self.writer = None

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from rqvae_ray.ray_backend.writer_actor import WriterActor

        self.cluster = start_ray(self.address)
        configure_data_context(self.block_bytes)
        # No GPU, and on the driver's node, where --out-dir is and where the Hugging Face token is configured (it is
        # read there, never shipped through Ray). One call at a time: each dataset's calls run in the driver's order.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.writer = (
            ray.remote(WriterActor)
            .options(num_cpus=0, num_gpus=0, max_concurrency=1, scheduling_strategy=here)
            .remote()
        )

    def dataset(self, datasets: int) -> DatasetStream:
        # A dataset planned later sees the nodes added since.
        return _RayStream(self.writer, self.cluster.now(), datasets, max(2, PENDING_WRITE_BYTES // self.block_bytes))

    def wait(self, futures: list[Future]) -> None:
        wait_watching_cluster(futures)

    def close(self) -> None:
        import ray

        if self.writer is not None:
            ray.kill(self.writer)
            self.writer = None


class _RayStream(DatasetStream):
    def __init__(self, writer, cluster: ClusterShape, datasets: int, max_pending: int) -> None:
        self.writer = writer
        self.max_pending = max_pending
        self.cluster = cluster
        self.datasets = datasets
        self.repo = ""

    def open(self, output: DatasetOutput) -> None:
        self.repo = output.repo
        # Not waited for: the writes queue behind it, and an error here fails them.
        self.writer.open.remote(output)

    def stream(self, loaded: Loaded, options: RunOptions, progress: Progress) -> Iterator[int]:
        import ray

        ready = loaded.ready
        rows = loaded.features.num_pois - loaded.first_pid + 1
        plan = plan_dataset([r.weights.nbytes for r in ready], rows, options.pools, self.cluster, self.datasets)
        progress.note(f"{loaded.repo}: {plan.describe()}")
        first = plan.pools[0]
        reserve_actors(first.num_cpus, first.num_gpus, plan.min_actors, options.actor_wait_s, self.cluster)
        ds = build_dataset(loaded, plan, options)
        pending: deque = deque()
        for ref, span in compat.block_refs(ds):
            pending.append(self.writer.write.remote(self.repo, ref, span))
            while pending and (len(pending) > self.max_pending or ray.wait([pending[0]], timeout=0)[0]):
                yield self._get(pending.popleft())
        while pending:
            yield self._get(pending.popleft())

    def finish(self) -> list[Published | Refused]:
        return self._get(self.writer.finish.remote(self.repo))

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        return self._get(self.writer.upload.remote(self.repo, message, retries, backoff_s))

    def _get(self, ref):
        """The result of a call to the writer; its death is :class:`WriterDied` (resumable), not Ray's own error."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            raise WriterDied(self.repo, _death_cause(exc)) from exc

    def abort(self, keep_resume: bool) -> None:
        import ray

        try:
            ray.get(self.writer.abort.remote(self.repo, keep_resume))
        except ray.exceptions.RayError:
            pass


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
