"""The execution plan (a pure function of the models, the data size, the options and the cluster)."""

from __future__ import annotations

import pytest

from rqvae_ray.outputs.layout import written_filenames
from rqvae_ray.pipeline.options import PoolMode, PoolSizing
from rqvae_ray.ray_backend.cluster import ClusterShape
from rqvae_ray.ray_backend.plan import (
    CPUS_PER_WRITER,
    PACKED_WEIGHTS_BYTES,
    SID_ROWS_PER_ACTOR,
    SID_ROWS_PER_WRITER,
    plan_dataset,
    plan_writers,
)

MB = 1 << 20
TWO_CPUS = ClusterShape(cpus=2, gpus=0)


def test_auto_packs_a_small_dataset_into_one_actor():
    plan = plan_dataset([3 * MB] * 5, 5135, PoolSizing(), TWO_CPUS, datasets=2)
    assert plan.mode is PoolMode.DATASET
    assert len(plan.pools) == 1 and plan.pools[0].models == (0, 1, 2, 3, 4)
    assert (plan.pools[0].min_actors, plan.pools[0].max_actors) == (1, 1)
    assert plan.pools[0].num_gpus == 0 and 0 < plan.pools[0].num_cpus <= 0.5
    assert plan.pools[0].tasks and "1 pool of Ray tasks, 1 at a time, x 5 model(s)" in plan.describe()


def test_only_an_auto_sized_pool_of_one_cpu_actor_for_little_work_runs_as_tasks():
    def tasks(pois: int, sizing: PoolSizing | None = None, cluster: ClusterShape = TWO_CPUS, models: int = 5):
        plan = plan_dataset([3 * MB] * models, pois, sizing or PoolSizing(), cluster, datasets=2)
        return [pool.tasks for pool in plan.pools]

    below = (SID_ROWS_PER_ACTOR - 1) // 5
    assert tasks(below) == [True]
    assert tasks(below + 1) == [False]  # an actor's worth of work: one actor (the 2 CPUs are shared by 2 datasets)
    assert tasks(5135, PoolSizing(min_actors=1)) == [False]  # the user sized the pool: actors as asked
    assert tasks(5135, PoolSizing(max_actors=1)) == [False]
    assert tasks(5135, PoolSizing(cpus_per_actor=1.0)) == [True]
    assert tasks(5135, PoolSizing(mode=PoolMode.MODEL)) == [False] * 5  # chained per-model pools stay actors
    assert tasks(5135, PoolSizing(mode=PoolMode.MODEL), models=1) == [True]
    assert tasks(5135, cluster=ClusterShape(cpus=2, gpus=1)) == [False]  # a GPU actor
    assert tasks(5135, PoolSizing(gpus_per_actor=0.5)) == [False]


def test_auto_adds_actors_with_the_work_up_to_the_cpus():
    big = plan_dataset([3 * MB] * 5, 2_000_000, PoolSizing(), TWO_CPUS, datasets=1)
    assert (big.pools[0].min_actors, big.pools[0].max_actors) == (2, 2)
    wide = plan_dataset([3 * MB] * 5, 2_000_000, PoolSizing(), ClusterShape(cpus=64, gpus=0), datasets=1)
    assert wide.pools[0].min_actors == 10_000_000 // SID_ROWS_PER_ACTOR
    # The encoder actors together reserve at most half of the CPUs, so that reading and writing always fit.
    assert wide.pools[0].num_cpus * wide.pools[0].min_actors <= 32


def test_auto_gives_each_model_a_pool_when_the_weights_do_not_fit_one_actor():
    plan = plan_dataset([PACKED_WEIGHTS_BYTES // 2 + 1] * 2, 1000, PoolSizing(), TWO_CPUS, datasets=1)
    assert plan.mode is PoolMode.MODEL and [p.models for p in plan.pools] == [(0,), (1,)]
    assert "too much for one actor" in plan.reason


@pytest.mark.parametrize("mode", [PoolMode.DATASET, PoolMode.MODEL])
def test_forced_mode_and_sizes(mode):
    sizing = PoolSizing(mode, min_actors=2, max_actors=4, cpus_per_actor=0.25, gpus_per_actor=0.5)
    plan = plan_dataset([MB] * 3, 100, sizing, TWO_CPUS, datasets=1)
    assert plan.mode is mode and plan.reason == f"--pools {mode.value}"
    assert len(plan.pools) == (1 if mode is PoolMode.DATASET else 3)
    for pool in plan.pools:
        assert (pool.min_actors, pool.max_actors, pool.num_cpus, pool.num_gpus) == (2, 4, 0.25, 0.5)
    assert plan.min_actors == 2 * len(plan.pools)


def test_gpus_are_shared_by_the_actors_of_all_datasets():
    plan = plan_dataset([MB] * 5, 5135, PoolSizing(), ClusterShape(cpus=16, gpus=1), datasets=2)
    assert plan.pools[0].min_actors == 1 and plan.pools[0].num_gpus == 0.5
    model = plan_dataset([MB] * 4, 5135, PoolSizing(PoolMode.MODEL), ClusterShape(cpus=16, gpus=2), datasets=1)
    assert [p.num_gpus for p in model.pools] == [0.5] * 4


def _names(*models: str) -> list[set[str]]:
    """Every name each model's codebooks CSV and its exports may have."""
    return [{f"codebooks-{m}.csv", *written_filenames(f"codebooks-{m}.csv")} for m in models]


def test_a_small_dataset_has_one_writer_on_the_drivers_node():
    plan = plan_writers(_names("a", "b", "c"), 3 * 5135, TWO_CPUS, datasets=2, local=True)
    assert plan.parts == ((0, 1, 2),) and not plan.anywhere
    assert plan.describe() == "1 writer(s) on the driver's node"


def test_writers_grow_with_the_work_within_the_cpus_where_they_may_run():
    models = [f"m{i}" for i in range(10)]
    big = ClusterShape(cpus=64, gpus=8, driver_cpus=8)
    rows = 10 * SID_ROWS_PER_WRITER
    # Local output: the driver's node only (8 CPUs: 4 writers), the models spread evenly over them.
    local = plan_writers(_names(*models), rows, big, datasets=1, local=True)
    assert len(local.parts) == 8 // CPUS_PER_WRITER and not local.anywhere
    assert sorted(i for part in local.parts for i in part) == list(range(10))
    assert {len(part) for part in local.parts} == {2, 3}
    # Upload only: the whole cluster, shared by the datasets running at once, never more writers than models.
    anywhere = plan_writers(_names(*models), rows, big, datasets=2, local=False)
    assert len(anywhere.parts) == 10 and anywhere.anywhere
    assert anywhere.describe() == "10 writer(s) spread over the cluster"
    # Less work: one writer per SID_ROWS_PER_WRITER SID rows.
    assert len(plan_writers(_names(*models), SID_ROWS_PER_WRITER + 1, big, datasets=1, local=False).parts) == 2
    # A private Ray is one node: its writers never go "anywhere".
    private = ClusterShape(cpus=64, gpus=0, private=True, driver_cpus=64)
    assert not plan_writers(_names(*models), rows, private, datasets=1, local=False).anywhere


def test_models_that_could_write_one_file_name_share_a_writer():
    # "a.b" and "a_b" both spell their 0-based index map codebooks-a_b-items.index.json: one writer holds both, so
    # that its check refuses them with one line, as one writer always did.
    names = _names("a.b", "c", "a_b", "d")
    assert names[0] & names[2]
    plan = plan_writers(names, 4 * SID_ROWS_PER_WRITER, ClusterShape(cpus=64, gpus=0, driver_cpus=64), 1, local=True)
    assert len(plan.parts) == 3
    assert any({0, 2} <= set(part) for part in plan.parts), plan.parts
