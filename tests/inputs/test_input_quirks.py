"""Inputs as other tools leave them: a pid_mapping.csv saved with a byte order mark, and a stray copy of a Parquet
shard, which must be named (not the shard it copies)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqvae_ray.errors import DatasetError
from rqvae_ray.inputs.demo import write_dataset
from rqvae_ray.inputs.features import load_features
from rqvae_ray.inputs.stores import FEATURES_PARQUET_DIR, METADATA_FILE, PID_MAPPING_FILE, LocalHub

REPO = "org/nyc"
N, DIM = 12, 9


def _load(hub: Path):
    return load_features(LocalHub(hub).dataset_files(*REPO.split("/")))


def _mapping_text(n: int = N) -> str:
    return "Original_Pid,Mapped_Pid\n" + "".join(f"poi-{pid},{pid}\n" for pid in range(1, n + 1))


@pytest.mark.parametrize("columns", ["Original_Pid,Mapped_Pid", "Mapped_Pid,Original_Pid"])
def test_a_pid_mapping_with_a_byte_order_mark_is_read(tmp_path, columns):
    features = np.eye(N, DIM, dtype=np.float32) + np.eye(N, DIM, 1, dtype=np.float32)
    write_dataset(tmp_path, REPO, features, {"total_dim": DIM, "num_pois": N}, [])
    first, second = columns.split(",")
    rows = "".join(f"poi-{pid},{pid}\n" if first == "Original_Pid" else f"{pid},poi-{pid}\n" for pid in range(1, N + 1))
    mapping = tmp_path / "datasets" / REPO / PID_MAPPING_FILE
    mapping.write_bytes(b"\xef\xbb\xbf" + f"{first},{second}\n{rows}".encode())
    assert _load(tmp_path).num_pois == N


def _shard(first: int, last: int) -> pa.Table:
    pids = list(range(first, last + 1))
    lists = [sorted({p % DIM, (p * 5) % DIM}) for p in pids]
    return pa.table({"Pid": pa.array(pids, pa.int64()), "indices": pa.array(lists, pa.list_(pa.int32()))})


def _parquet_hub(hub: Path, shards: dict[str, tuple[int, int]]) -> Path:
    base = hub / "datasets" / REPO
    (base / FEATURES_PARQUET_DIR).mkdir(parents=True)
    (base / PID_MAPPING_FILE).parent.mkdir(parents=True)
    for name, (first, last) in shards.items():
        pq.write_table(_shard(first, last), base / FEATURES_PARQUET_DIR / name)
    (base / METADATA_FILE).write_text(json.dumps({"total_dim": DIM, "num_pois": N}))
    (base / PID_MAPPING_FILE).write_text(_mapping_text())
    return hub


@pytest.mark.parametrize(
    ("copy", "blamed", "named"),
    [
        # '-' sorts before '.': the copy is read first and the shard it copies is the one that breaks the Pids.
        ("part-1-copy.parquet", "part-1.parquet", "part-1-copy.parquet"),
        # '_' sorts after '.': the copy itself breaks the Pids, and the shard it copies is named too.
        ("part-1_copy.parquet", "part-1_copy.parquet", "part-1.parquet"),
    ],
)
def test_a_stray_copy_of_a_shard_is_named(tmp_path, copy, blamed, named):
    hub = _parquet_hub(tmp_path, {"part-0.parquet": (1, 5), "part-1.parquet": (6, N)})
    assert _load(hub).num_pois == N
    shards = tmp_path / "datasets" / REPO / FEATURES_PARQUET_DIR
    shutil.copy(shards / "part-1.parquet", shards / copy)
    with pytest.raises(DatasetError) as caught:
        _load(hub)
    message = str(caught.value)
    assert message.startswith(f"{REPO}: {blamed}: row 1 (1-based) has Pid 6 where Pid 13 was expected"), message
    assert message.endswith(
        f"; Pid 6 is already in {named} (Pids 6-{N}), read before it: if one of the two is a stray copy, remove it"
    )
    assert "\n" not in message
