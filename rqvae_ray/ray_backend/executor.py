"""The Ray executor: each dataset's blocks stream from the object store or a Ray Data datasource (see
:mod:`rqvae_ray.ray_backend.datasource`) through its encoder actor pools (see
:mod:`rqvae_ray.ray_backend.plan`) to its writers (see :mod:`rqvae_ray.ray_backend.writing`): writer actors, which
receive object references only, or, on a private Ray, this process, one block at a time.

Ray's own processes are tied to the thread that starts them, so Ray starts (or is joined) from the main thread while
the datasets load in worker threads.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from concurrent.futures import Future

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.inputs.features import PoiFeatures
from rqvae_ray.outputs.layout import written_filenames
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
from rqvae_ray.ray_backend.plan import ENCODER_CPU_SHARE, DatasetPlan, plan_dataset, plan_writers, task_rows
from rqvae_ray.ray_backend.writing import ActorWriting, DriverWriting, Writers
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
        wait_watching_cluster(futures, self.cluster.private)

    def close(self) -> None:
        self.writers.close()

    def abandon(self) -> None:
        """Nothing: the writers end with the Ray that holds them (they may be serving a dataset still, or be lost)."""


class _RayStream(DatasetStream):
    """One dataset on Ray: its blocks stream through its encoder pools to its writing (see
    :mod:`rqvae_ray.ray_backend.writing`): writer actors, each writing the files of some of its models (see
    :func:`~rqvae_ray.ray_backend.plan.plan_writers`), or this process on a private Ray when one writer is planned."""

    def __init__(self, writers: Writers, cluster: ClusterShape, datasets: int, max_pending: int) -> None:
        self.pool = writers
        self.max_pending = max_pending
        self.cluster = cluster
        self.datasets = datasets
        self.writing: DriverWriting | ActorWriting | None = None

    def open(self, output: DatasetOutput) -> None:
        names = [{target.filename, *written_filenames(target.filename)} for target in output.targets]
        rows = (output.num_pois - output.first_pid + 1) * len(output.targets)
        plan = plan_writers(names, rows, self.cluster, self.datasets, local=output.folder is not None)
        if self.cluster.private and len(plan.parts) == 1:
            self.writing = DriverWriting(output)
        else:
            self.writing = ActorWriting(self.pool, plan, output, self.max_pending)

    def stream(self, loaded: Loaded, options: RunOptions, progress: Progress) -> Iterator[int]:
        rows = loaded.features.num_pois - loaded.first_pid + 1
        plan = plan_dataset([r.weights.nbytes for r in loaded.ready], rows, options.pools, self.cluster, self.datasets)
        progress.note(f"{loaded.repo}: {plan.describe()}; {self.writing.describe()}")
        first = plan.pools[0]
        reserve_actors(first.num_cpus, first.num_gpus, plan.min_actors, options.actor_wait_s, self.cluster)
        with compat.block_refs(build_dataset(loaded, plan, options, self.cluster)) as blocks:
            yield from self.writing.write(blocks)

    def finish(self) -> list[Published | Refused]:
        return self.writing.finish()

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        return self.writing.upload(message, retries, backoff_s)

    def abort(self, keep_resume: bool) -> None:
        if self.writing is not None:
            self.writing.abort(keep_resume)


def build_dataset(loaded: Loaded, plan: DatasetPlan, options: RunOptions, cluster: ClusterShape):
    """The Ray Dataset of one plan: the POI rows from ``loaded.first_pid`` on in Pid order (cut into small blocks first
    where :func:`~rqvae_ray.ray_backend.plan.task_rows` says so) through the plan's pools (chained one after another
    when there are several; actors, or tasks where the plan says so); each output block holds ``Pid`` and every
    model's columns."""
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from rqvae_ray.ray_backend.datasource import poi_dataset
    from rqvae_ray.ray_backend.task_stage import encode_in_task

    features: PoiFeatures = loaded.features
    block_rows = max(options.batch_size, MIN_BLOCK_ROWS)
    # Parquet shards are read on the driver's node, where a read task asking for a CPU may never get one (a large
    # cluster's head often has none: Ray advises --num-cpus=0 there; and Ray Data's repartition tasks, a CPU each, and
    # the reads starved each other where the encoder actors hold the rest: a 20 s stall on 2 CPUs), so the reads
    # reserve none, a few at a time.
    reads = max(1, math.floor(cluster.driver_cpus * (1 - ENCODER_CPU_SHARE))) if features.shards else None
    ds = poi_dataset(features, block_rows, loaded.first_pid, reads_without_cpu=reads)
    cut = task_rows(bool(features.shards), options.output.fmt, block_rows)
    if cut is not None:
        ds = compat.cut_blocks(ds, cut)
    batches = {"batch_size": options.batch_size, "batch_format": "pyarrow", "zero_copy_batch": True}
    for number, pool in enumerate(plan.pools):
        stage = {
            "repo": features.repo,
            "models": stage_models(loaded, pool.models),
            "spec": options.output,
            "keep_inputs": number < len(plan.pools) - 1,
            "use_gpu": pool.num_gpus > 0,
            "encoder_factory": options.encoder_factory,
        }
        if pool.tasks:
            ds = ds.map_batches(
                encode_in_task,
                fn_kwargs={"stage_key": uuid.uuid4().hex, **stage},
                **batches,
                compute=TaskPoolStrategy(size=pool.max_actors),
                num_cpus=pool.num_cpus,
            )
        else:
            ds = ds.map_batches(
                EncodeModels,
                fn_constructor_kwargs=stage,
                **batches,
                compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
                num_cpus=pool.num_cpus,
                num_gpus=pool.num_gpus or None,
            )
    return ds
