"""The execution plan of one dataset: which models share an encoder actor pool, how many actors, of what size.

Two plans, with byte-identical outputs:

* ``dataset``: one pool whose actors hold every model of the dataset; each batch is decoded once and passes through
  every model, and each model's output goes straight to the writer.
* ``model``: one pool per model, chained (each pool appends its model's columns and passes the block on); for models
  too large to share an actor or a GPU, or pools that must be sized apart.

``auto`` packs a dataset's models into one pool unless their weights together exceed :data:`PACKED_WEIGHTS_BYTES`.

A pool that auto sizes to one CPU actor for work below :data:`SID_ROWS_PER_ACTOR` runs as Ray tasks instead, one at a
time (see :mod:`rqvae_ray.ray_backend.task_stage`): the same instances, in a pooled worker process rather than an
actor of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.inputs.blocks import MEMORY_BLOCKS_PER_PIECE
from rqvae_ray.pipeline.options import PoolMode, PoolSizing
from rqvae_ray.ray_backend.cluster import ClusterShape

# Above this much float64 weights in one actor, auto gives each model its own pool.
PACKED_WEIGHTS_BYTES = 2 << 30
# SID rows (POIs x models) that one CPU actor encodes in a few seconds, about what starting an actor costs: auto adds
# an actor to a pool per this many SID rows, up to the pool's share of the cluster's CPUs.
SID_ROWS_PER_ACTOR = 1_000_000
# GPU actors cost more to start (torch and CUDA) and encode faster.
SID_ROWS_PER_GPU_ACTOR = 5_000_000
# Encoder actors reserve at most this share of the cluster's CPUs, leaving the rest to reading and writing.
ENCODER_CPU_SHARE = 0.5


@dataclass(frozen=True)
class Pool:
    """One actor pool: the indices (in the dataset's model list) of the models each of its actors holds."""

    models: tuple[int, ...]
    min_actors: int
    max_actors: int
    num_cpus: float
    num_gpus: float
    # Ray tasks, at most max_actors at a time, rather than actors: work too small to be worth an actor's start.
    tasks: bool = False


@dataclass(frozen=True)
class DatasetPlan:
    """The pools of one dataset, and why."""

    mode: PoolMode
    pools: tuple[Pool, ...]
    reason: str

    @property
    def min_actors(self) -> int:
        return sum(pool.min_actors for pool in self.pools)

    def describe(self) -> str:
        """One line such as ``1 pool of 2 actors x 5 models (auto: ...)``."""
        first = self.pools[0]
        size = (
            f"{first.min_actors}" if first.min_actors == first.max_actors else f"{first.min_actors}-{first.max_actors}"
        )
        device = f"{first.num_gpus:g} GPU" if first.num_gpus else f"{first.num_cpus:g} CPU"
        why = self.reason
        if first.tasks:
            shape = f"1 pool of Ray tasks, {size} at a time, x {len(first.models)} model(s)"
            why += f"; under {SID_ROWS_PER_ACTOR:,} SID rows: tasks, no actor"
        elif self.mode is PoolMode.DATASET:
            shape = f"1 pool of {size} actor(s) x {len(first.models)} model(s)"
        else:
            shape = f"{len(self.pools)} pool(s) (one per model) of {size} actor(s)"
        return f"{shape}, {device} each ({why})"


def plan_dataset(
    weights_bytes: list[int], num_pois: int, sizing: PoolSizing, cluster: ClusterShape, datasets: int
) -> DatasetPlan:
    """Plan one dataset of ``num_pois`` POIs whose models' weights take ``weights_bytes``; ``datasets`` run at once."""
    mode, reason = _mode(weights_bytes, sizing.mode)
    groups = (
        [tuple(range(len(weights_bytes)))] if mode is PoolMode.DATASET else [(i,) for i in range(len(weights_bytes))]
    )
    gpus = sizing.gpus_per_actor
    use_gpus = (gpus is None and cluster.gpus > 0) or bool(gpus)
    sid_rows = num_pois * len(groups[0])
    per_pool = _actors(sizing, sid_rows, use_gpus, cluster, datasets * len(groups))
    total = datasets * len(groups) * per_pool[0]
    if gpus is None:
        gpus = min(1.0, cluster.gpus / total) if cluster.gpus else 0.0
    cpus = sizing.cpus_per_actor
    if cpus is None:
        cpus = max(0.01, min(1.0, math.floor(100 * ENCODER_CPU_SHARE * cluster.cpus / total) / 100))
    # Below an actor's worth of work, an actor's start (its own process, Ray Data's tracking of its location) costs
    # more than the work: one CPU pool, auto-sized (so to one actor, by _actors), runs as tasks in a worker process
    # Ray reuses.
    tasks = (
        len(groups) == 1
        and not gpus
        and sizing.min_actors is None
        and sizing.max_actors is None
        and sid_rows < SID_ROWS_PER_ACTOR
    )
    pools = tuple(Pool(group, per_pool[0], per_pool[1], cpus, gpus, tasks) for group in groups)
    return DatasetPlan(mode, pools, reason)


def _mode(weights_bytes: list[int], asked: PoolMode) -> tuple[PoolMode, str]:
    if asked is not PoolMode.AUTO:
        return asked, f"--pools {asked.value}"
    packed = sum(weights_bytes)
    if len(weights_bytes) > 1 and packed > PACKED_WEIGHTS_BYTES:
        return (
            PoolMode.MODEL,
            f"auto: the models' weights together take {packed / 2**30:.1f} GiB, too much for one actor",
        )
    return PoolMode.DATASET, "auto: the models fit in one actor"


def _actors(sizing: PoolSizing, sid_rows: int, use_gpus: bool, cluster: ClusterShape, pools: int) -> tuple[int, int]:
    """(min, max) actors per pool: the user's, else enough for the work, within the pool's share of the cluster."""
    if sizing.min_actors is not None or sizing.max_actors is not None:
        low = sizing.min_actors or 1
        return low, max(low, sizing.max_actors or low)
    if use_gpus:
        share = max(1, math.floor(cluster.gpus / pools)) if cluster.gpus else 1
        wanted = math.ceil(sid_rows / SID_ROWS_PER_GPU_ACTOR)
    else:
        share = max(1, math.floor(cluster.cpus / pools))
        wanted = math.ceil(sid_rows / SID_ROWS_PER_ACTOR)
    count = max(1, min(share, wanted))
    return count, count


def task_rows(shards: bool, fmt: OutputFormat, block_rows: int) -> int | None:
    """The POIs of each input block of an encoder task when the read blocks must be cut first; None when they need not.

    An actor pool's task is one input block, and Ray Data gathers a read task's blocks into blocks of up to its block
    size of *input*. CSV's blocks (16 MiB, about one batch's CSV) then hold ~229k POIs of a Parquet shard, each ~56
    blocks of CSV out; with rows kept in order, one actor's finished blocks wait for the other actor's task, Ray Data's
    share of the store fills, and both actors sit idle (1 M POIs: 8 tasks, the machine ~70 % idle for seconds). Cut
    into blocks of a few batches (rows in memory come in blocks of one batch, or read pieces of a few), tasks stay
    small. Parquet output (4 MiB blocks, ~6x the input) keeps its read blocks: cutting them cost it ~1 s and gained
    nothing.
    """
    if shards and fmt is OutputFormat.CSV:
        return block_rows * MEMORY_BLOCKS_PER_PIECE
    return None


# The CPUs that one writer actor keeps busy at full speed (formatting is done by the encoders; it hashes, writes and
# journals, with a thread per file): the writers of a run take at most the CPUs where they may run over this.
CPUS_PER_WRITER = 2
# SID rows that one writer actor takes a minute or so to write as CSV, far more than starting it costs: a dataset gets
# another writer per this many SID rows.
SID_ROWS_PER_WRITER = 20_000_000


@dataclass(frozen=True)
class WriterPlan:
    """The writer actors of one dataset: the models (indices into its targets) each writes, and whether they may run
    on any node (an upload-only run) rather than on the driver's, where ``--out-dir`` is."""

    parts: tuple[tuple[int, ...], ...]
    anywhere: bool

    def describe(self) -> str:
        where = "spread over the cluster" if self.anywhere else "on the driver's node"
        return f"{len(self.parts)} writer(s) {where}"


def plan_writers(
    filenames: list[set[str]], sid_rows: int, cluster: ClusterShape, datasets: int, local: bool
) -> WriterPlan:
    """Split one dataset's models among writer actors: a writer per :data:`SID_ROWS_PER_WRITER` SID rows, within the
    dataset's share of the CPUs where writers may run (the driver's node for ``local`` output, else the cluster), never
    more than the models; ``filenames[i]``, every name model i may write, keeps models that could write one name in
    one writer (the writer refuses them with one line)."""
    cpus = cluster.driver_cpus if local else cluster.cpus
    share = max(1, math.floor(cpus / CPUS_PER_WRITER / datasets))
    groups = _sharing_groups(filenames)
    count = max(1, min(share, len(groups), math.ceil(sid_rows / SID_ROWS_PER_WRITER)))
    parts: list[list[int]] = [[] for _ in range(count)]
    for group in sorted(groups, key=len, reverse=True):  # the largest group first, each to the smallest part
        min(parts, key=len).extend(group)
    return WriterPlan(tuple(tuple(sorted(part)) for part in parts), anywhere=not local and not cluster.private)


def _sharing_groups(filenames: list[set[str]]) -> list[list[int]]:
    """The models in groups such that no two groups have a file name in common (connected by shared names)."""
    group_of = list(range(len(filenames)))

    def root(model: int) -> int:
        while group_of[model] != model:
            model = group_of[model]
        return model

    owner: dict[str, int] = {}
    for model, names in enumerate(filenames):
        for name in names:
            other = owner.setdefault(name, model)
            group_of[root(model)] = root(other)
    groups: dict[int, list[int]] = {}
    for model in range(len(filenames)):
        groups.setdefault(root(model), []).append(model)
    return list(groups.values())
