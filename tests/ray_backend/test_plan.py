"""The execution plan (a pure function of the models, the data size, the options and the cluster)."""

from __future__ import annotations

import pytest

from rqvae_ray.pipeline.options import PoolMode, PoolSizing
from rqvae_ray.ray_backend.cluster import ClusterShape
from rqvae_ray.ray_backend.plan import PACKED_WEIGHTS_BYTES, SID_ROWS_PER_ACTOR, plan_dataset

MB = 1 << 20
TWO_CPUS = ClusterShape(cpus=2, gpus=0)


def test_auto_packs_a_small_dataset_into_one_actor():
    plan = plan_dataset([3 * MB] * 5, 5135, PoolSizing(), TWO_CPUS, datasets=2)
    assert plan.mode is PoolMode.DATASET
    assert len(plan.pools) == 1 and plan.pools[0].models == (0, 1, 2, 3, 4)
    assert (plan.pools[0].min_actors, plan.pools[0].max_actors) == (1, 1)
    assert plan.pools[0].num_gpus == 0 and 0 < plan.pools[0].num_cpus <= 0.5
    assert "1 actor(s) x 5 model(s)" in plan.describe()


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
