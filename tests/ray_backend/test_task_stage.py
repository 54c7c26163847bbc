"""The encode stage as a Ray task (small pools): the same columns as the stage itself, the stage built once per
worker process for each dataset run, and only the latest few kept."""

from __future__ import annotations

import pyarrow as pa

from rqvae_ray.core.contract import OutputSpec, StageModel
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.ray_backend import task_stage
from rqvae_ray.stages.encode import EncodeModels
from tests.unit_models import rows, weights


def _stage(seed: int) -> dict:
    return {"repo": "org/ds", "models": [StageModel("org/m", 0, weights(seed))], "spec": OutputSpec()}


def _without_timing(table: pa.Table) -> pa.Table:
    return table.drop_columns([name for name in table.column_names if name.endswith(".seconds")])


def test_a_task_encodes_as_the_stage_and_builds_it_once_per_run(monkeypatch):
    monkeypatch.setattr(task_stage, "_stages", type(task_stage._stages)())
    builds: list[int] = []
    real_init = EncodeModels.__init__

    def counting_init(self, **kwargs):
        builds.append(1)
        real_init(self, **kwargs)

    batch = sparse_table(rows(50, seed=3))
    expected = _without_timing(EncodeModels(**_stage(1))(batch))
    monkeypatch.setattr(EncodeModels, "__init__", counting_init)
    first = _without_timing(task_stage.encode_in_task(batch, stage_key="run-a", **_stage(1)))
    again = _without_timing(task_stage.encode_in_task(batch.slice(10, 20), stage_key="run-a", **_stage(1)))
    assert first.equals(expected) and again.equals(expected.slice(10, 20))
    assert len(builds) == 1
    other = task_stage.encode_in_task(batch, stage_key="run-b", **_stage(2))  # another run's models: built anew
    assert len(builds) == 2 and not _without_timing(other).equals(expected)


def test_a_worker_keeps_only_the_latest_stages(monkeypatch):
    monkeypatch.setattr(task_stage, "_stages", type(task_stage._stages)())
    batch = sparse_table(rows(5))
    for key in ("a", "b", "c", "d"):
        task_stage.encode_in_task(batch, stage_key=key, **_stage(1))
    task_stage.encode_in_task(batch, stage_key="a", **_stage(1))  # used again: now the latest
    task_stage.encode_in_task(batch, stage_key="e", **_stage(1))
    assert task_stage.KEPT_STAGES == 4 and list(task_stage._stages) == ["c", "d", "a", "e"]
