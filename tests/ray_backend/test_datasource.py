"""Where the POI rows enter Ray: rows in memory put into the object store by the driver, or read by read tasks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.inputs.blocks import iter_blocks
from rqvae_ray.inputs.features import PoiFeatures
from rqvae_ray.ray_backend import compat, datasource
from rqvae_ray.ray_backend.cluster import configure_data_context

POIS = 2_345
BLOCK_ROWS = 300


def _features() -> PoiFeatures:
    """Rows of 1 to 4 features each, some with values other than one."""
    counts = np.arange(POIS) % 4 + 1
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate([np.arange(c) * 7 + row % 5 for row, c in enumerate(counts)]).astype(np.int64)
    values = np.where(np.arange(len(indices)) % 3 == 0, 0.5, 1.0).astype(np.float32)
    return PoiFeatures("org/rows", 40, POIS, "", "", rows=SparseRows(indptr, indices, values))


def _rows(block: pa.Table, part: tuple[int, int] | None) -> pa.Table:
    return block if part is None else block.slice(part[0], part[1] - part[0])


@pytest.mark.parametrize("up_front", [True, False], ids=["put-by-the-driver", "read-tasks"])
@pytest.mark.parametrize("start_pid", [1, 1_234])
def test_rows_in_memory_enter_ray_the_same_either_way(local_ray, monkeypatch, up_front, start_pid):
    """Rows the object store takes at once are put there by this process in blocks of the batch size (a dataset
    already materialized: no read task to start a worker for); larger ones go through read tasks. The same rows, in
    Pid order, from ``start_pid``."""
    from ray.data.dataset import MaterializedDataset

    if not up_front:
        monkeypatch.setattr(datasource, "UP_FRONT_BYTES", 0)
    configure_data_context()
    features = _features()
    ds = datasource.poi_dataset(features, BLOCK_ROWS, start_pid)
    assert isinstance(ds, MaterializedDataset) == up_front
    with compat.block_refs(ds) as refs:
        got = [_rows(local_ray.get(ref), part) for ref, part in refs]
    expected = list(iter_blocks(features, BLOCK_ROWS, start_pid))
    if up_front:
        assert [len(block) for block in got] == [len(block) for block in expected]
    assert pa.concat_tables(got).equals(pa.concat_tables(expected))
    assert pa.concat_tables(got)["Pid"].to_pylist() == list(range(start_pid, POIS + 1))
