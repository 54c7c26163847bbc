"""Features validation in process, before anything reaches Ray: ``.pt`` and Parquet datasets, metadata.json,
pid_mapping.csv, and the Arrow round trip of sparse rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.rows import rows_from_table, sparse_table
from rqvae_ray.errors import DatasetError
from rqvae_ray.inputs.demo import write_dataset
from rqvae_ray.inputs.features import check_pid_mapping, load_features
from rqvae_ray.inputs.stores import (
    FEATURES_FILE,
    FEATURES_PARQUET_DIR,
    METADATA_FILE,
    PID_MAPPING_FILE,
    DatasetFiles,
    LocalHub,
)

REPO = "org/nyc"
N, DIM = 12, 9


def _features() -> np.ndarray:
    rng = np.random.default_rng(3)
    dense = (rng.random((N, DIM)) < 0.3).astype(np.float32)
    dense[:, 0] = 1.0  # every POI has at least one feature
    return dense


def _mapping(n: int = N) -> list[tuple[str, int]]:
    return [(f"poi-{pid:04d}", pid) for pid in range(1, n + 1)]


def _base(hub: Path) -> Path:
    return hub / "datasets" / REPO


def _pt_hub(hub: Path, features: np.ndarray | None = None, meta: dict | None = None, mapping=None) -> Path:
    features = _features() if features is None else features
    meta = {"total_dim": DIM, "num_pois": len(features)} if meta is None else meta
    write_dataset(hub, REPO, features, meta, _mapping(len(features)) if mapping is None else mapping)
    return hub


def _load(hub: Path):
    return load_features(LocalHub(hub).dataset_files(*REPO.split("/")))


def _refused(hub: Path, *parts: str) -> str:
    """The one-line reason loading the dataset fails with; it must name every one of ``parts``."""
    with pytest.raises(DatasetError) as caught:
        _load(hub)
    message = str(caught.value)
    assert "\n" not in message and caught.value.repo == REPO
    for part in parts:
        assert part in message, message
    return message


# ---- .pt datasets -------------------------------------------------------------------------------------------------


def test_pt_dataset_loads(tmp_path):
    features = _features()
    hub = _pt_hub(tmp_path, features)
    loaded = _load(hub)
    assert (loaded.repo, loaded.num_pois, loaded.dim, loaded.shards, loaded.revision) == (REPO, N, DIM, (), "local")
    assert loaded.sha256 == hashlib.sha256((_base(hub) / FEATURES_FILE).read_bytes()).hexdigest()
    expected = SparseRows.from_dense(features)
    np.testing.assert_array_equal(loaded.rows.indptr, expected.indptr)
    np.testing.assert_array_equal(loaded.rows.indices, expected.indices)
    assert loaded.rows.values is None  # multi-hot


@pytest.mark.parametrize(
    ("content", "parts"),
    [
        (None, ["metadata.json' is missing"]),
        ("{not json", ["metadata.json is not valid JSON"]),
        ("[1407]", ["metadata.json has no 'total_dim'"]),
        ('{"num_pois": 12}', ["metadata.json has no 'total_dim'"]),
        ('{"total_dim": "9"}', ["total_dim '9'", "expected an integer >= 1"]),
        ('{"total_dim": 9.0}', ["total_dim 9.0", "expected an integer >= 1"]),
        ('{"total_dim": 0}', ["total_dim 0", "expected an integer >= 1"]),
        ('{"total_dim": 9, "num_pois": -1}', ["num_pois -1", "expected an integer >= 0"]),
        ('{"total_dim": 9, "num_pois": null}', ["num_pois None"]),
        ('{"total_dim": 8, "num_pois": 12}', ["total_dim 8 but the features have 9 columns"]),
        ('{"total_dim": 9, "num_pois": 13}', ["num_pois 13 but the features have 12 rows"]),
    ],
    ids=[
        "missing",
        "not-json",
        "not-an-object",
        "no-total-dim",
        "total-dim-string",
        "total-dim-float",
        "total-dim-zero",
        "num-pois-negative",
        "num-pois-null",
        "total-dim-disagrees",
        "num-pois-disagrees",
    ],
)
def test_metadata_problems_are_named(tmp_path, content, parts):
    hub = _pt_hub(tmp_path)
    path = _base(hub) / METADATA_FILE
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    _refused(hub, *parts)


def test_metadata_without_num_pois_is_accepted(tmp_path):
    hub = _pt_hub(tmp_path, meta={"total_dim": DIM, "source": "GNPR-SID"})
    assert _load(hub).num_pois == N


def _mapping_text(hub: Path, text: str) -> None:
    (_base(hub) / PID_MAPPING_FILE).write_text(text)


@pytest.mark.parametrize(
    ("rows", "parts"),
    [
        (_mapping()[:-2], ["pid_mapping.csv has 10 rows but the features have 12"]),
        (_mapping() + [("extra", 13)], ["pid_mapping.csv has 13 rows but the features have 12"]),
        (_mapping()[:-1] + [("dup", 4)], ["pid_mapping.csv repeats Mapped_Pid 4"]),
        (_mapping()[:-1] + [("zero", 0)], ["Mapped_Pid 0", "must run 1..12"]),
        (_mapping()[:-1] + [("beyond", 13)], ["Mapped_Pid 13", "must run 1..12"]),
    ],
    ids=["short", "long", "duplicate", "zero", "beyond-n"],
)
def test_pid_mapping_problems_are_named(tmp_path, rows, parts):
    _refused(_pt_hub(tmp_path, mapping=rows), *parts)


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        (None, ["pid_mapping.csv' is missing"]),
        ("", ["pid_mapping.csv has no 'Mapped_Pid' column"]),
        ("Original_Pid,Pid\na,1\n", ["pid_mapping.csv has no 'Mapped_Pid' column"]),
        ("Original_Pid,Mapped_Pid\na,1\nb,two\n", ["pid_mapping.csv is unreadable", "two"]),
        ("Original_Pid,Mapped_Pid\na,1\nb\n", ["pid_mapping.csv is unreadable"]),
        ("Original_Pid,Mapped_Pid\na,1\nb,2\nc,\n", ["pid_mapping.csv has an empty Mapped_Pid in data row 3"]),
    ],
    ids=["missing", "empty-file", "no-column", "not-a-number", "short-row", "empty-value"],
)
def test_unreadable_pid_mapping_is_named(tmp_path, text, parts):
    hub = _pt_hub(tmp_path)
    if text is None:
        (_base(hub) / PID_MAPPING_FILE).unlink()
    else:
        _mapping_text(hub, text)
    _refused(hub, *parts)


def test_pid_mapping_in_any_order_is_accepted(tmp_path):
    rows = _mapping()[::-1]
    assert _load(_pt_hub(tmp_path, mapping=rows)).num_pois == N


def test_pid_mapping_repeat_is_found_across_csv_batches(tmp_path):
    """A repeat far apart in a mapping large enough to be read in several batches is still found."""
    n = 150_000
    path = tmp_path / "pid_mapping.csv"
    pids = np.arange(1, n + 1)
    pids[-1] = 2  # Pid n is missing, Pid 2 appears in the first and the last batch
    path.write_text("Original_Pid,Mapped_Pid\n" + "".join(f"original-{i:08d},{pid}\n" for i, pid in enumerate(pids)))
    assert sum(1 for _ in pacsv.open_csv(path)) > 1  # the check really streams
    files = DatasetFiles(REPO, [tmp_path / "poi_features.pt"], None, path, "local")
    with pytest.raises(DatasetError, match="repeats Mapped_Pid 2;"):
        check_pid_mapping(files, n)
    path.write_text("Original_Pid,Mapped_Pid\n" + "".join(f"original-{i:08d},{i + 1}\n" for i in range(n)))
    check_pid_mapping(files, n)


@pytest.mark.parametrize(("value", "pid"), [(np.nan, 5), (np.inf, 1), (-np.inf, 12)])
def test_non_finite_features_name_the_pid(tmp_path, value, pid):
    features = _features()
    features[pid - 1, 4] = value
    _refused(_pt_hub(tmp_path, features), f"NaN or Inf (first at Pid {pid})")


def test_empty_tensor_is_refused(tmp_path):
    hub = _pt_hub(tmp_path, _features()[:0], meta={"total_dim": DIM, "num_pois": 0}, mapping=[])
    _refused(hub, "the feature tensor is empty (0 POIs)")


def _saved(hub: Path, obj: object) -> Path:
    torch.save(obj, _base(hub) / FEATURES_FILE)
    return hub


@pytest.mark.parametrize(
    ("obj", "parts"),
    [
        ({"features": torch.zeros(N, DIM)}, ["found a dict {'features': a 2-D tensor [12, 9] (torch.float32)}"]),
        ({"x": torch.zeros(N, DIM), "y": torch.zeros(N)}, ["'x': a 2-D tensor [12, 9]", "'y': a 1-D tensor [12]"]),
        ({"features": [1.0, 2.0]}, ["found a dict {'features': a list}"]),
        (torch.zeros(N * DIM), ["found a 1-D tensor [108] (torch.float32)"]),
        ([torch.zeros(N, DIM)], ["found a list"]),
    ],
    ids=["one-key-dict", "two-key-dict", "one-key-dict-of-list", "1-d-tensor", "list"],
)
def test_pt_that_is_not_a_2d_tensor_says_what_it_holds(tmp_path, obj, parts):
    message = _refused(
        _saved(_pt_hub(tmp_path), obj), "poi_features.pt must hold a 2-D tensor [POIs, features]", *parts
    )
    assert "torch.save(tensor, path)" in message


def test_pt_with_python_objects_or_garbage_is_refused(tmp_path):
    hub = _saved(_pt_hub(tmp_path), {"when": Path("x")})
    _refused(hub, "holds Python objects, not a tensor")
    (_base(hub) / FEATURES_FILE).write_bytes(b"not a torch file")
    _refused(hub, "poi_features.pt is not a torch.save archive (corrupt or truncated)")


def test_complex_tensor_is_refused(tmp_path):
    _refused(_saved(_pt_hub(tmp_path), torch.zeros(N, DIM, dtype=torch.complex64)), "dtype torch.complex64")


# ---- Parquet datasets ---------------------------------------------------------------------------------------------


def _sparse_shard(pids: list[int], dim: int = DIM, values: bool = False) -> pa.Table:
    """A sparse shard: Pid ``p`` has the columns ``p % dim`` and ``(p * 7) % dim`` (ascending, distinct)."""
    lists = [sorted({p % dim, (p * 7) % dim}) for p in pids]
    columns = {"Pid": pa.array(pids, pa.int64()), "indices": pa.array(lists, pa.list_(pa.int32()))}
    if values:
        columns["values"] = pa.array([[0.5] * len(row) for row in lists], pa.list_(pa.float32()))
    return pa.table(columns)


def _parquet_hub(hub: Path, shards: list[pa.Table], n: int | None = None, row_group_size: int = 3, **write) -> Path:
    """A Parquet dataset of ``shards`` (``part-00000.parquet``, ...), with metadata and mapping for ``n`` POIs."""
    n = sum(len(shard) for shard in shards) if n is None else n
    base = _base(hub)
    (base / FEATURES_PARQUET_DIR).mkdir(parents=True, exist_ok=True)
    (base / PID_MAPPING_FILE).parent.mkdir(parents=True, exist_ok=True)
    for index, shard in enumerate(shards):
        path = base / FEATURES_PARQUET_DIR / f"part-{index:05d}.parquet"
        pq.write_table(shard, path, row_group_size=row_group_size, **write)
    (base / METADATA_FILE).write_text(json.dumps({"total_dim": DIM, "num_pois": n}))
    (base / PID_MAPPING_FILE).write_text(
        "Original_Pid,Mapped_Pid\n" + "".join(f"{o},{p}\n" for o, p in _mapping(n)), newline=""
    )
    return hub


def _shards(*ranges: tuple[int, int]) -> list[pa.Table]:
    return [_sparse_shard(list(range(first, last + 1))) for first, last in ranges]


def test_parquet_dataset_loads(tmp_path):
    hub = _parquet_hub(tmp_path, _shards((1, 5), (6, 12)))
    loaded = _load(hub)
    names = [Path(shard).name for shard in loaded.shards]
    assert (loaded.num_pois, loaded.dim, loaded.rows, names) == (
        N,
        DIM,
        None,
        ["part-00000.parquet", "part-00001.parquet"],
    )
    digest = hashlib.sha256()
    for shard in loaded.shards:
        digest.update(Path(shard).read_bytes())
    assert loaded.sha256 == digest.hexdigest()


def test_parquet_with_narrow_pid_and_large_lists_loads(tmp_path):
    table = _sparse_shard(list(range(1, N + 1)), values=True)
    table = table.cast(
        pa.schema(
            [("Pid", pa.int32()), ("indices", pa.large_list(pa.int64())), ("values", pa.large_list(pa.float64()))]
        )
    )
    assert _load(_parquet_hub(tmp_path, [table])).num_pois == N


@pytest.mark.parametrize(
    ("ranges", "parts"),
    [
        (((1, 5), (7, 13)), ["part-00001.parquet: row 1 (1-based) has Pid 7 where Pid 6 was expected"]),
        (((1, 5), (5, 11)), ["part-00001.parquet: row 1 (1-based) has Pid 5 where Pid 6 was expected"]),
        (((6, 12), (1, 5)), ["part-00000.parquet: row 1 (1-based) has Pid 6 where Pid 1 was expected"]),
        (((2, 13),), ["part-00000.parquet: row 1 (1-based) has Pid 2 where Pid 1 was expected"]),
    ],
    ids=["gap-between-shards", "repeat-between-shards", "shards-out-of-order", "first-pid-not-1"],
)
def test_pid_problems_across_shards_name_shard_row_and_pids(tmp_path, ranges, parts):
    _refused(_parquet_hub(tmp_path, _shards(*ranges), n=N), *parts, "Pids must run 1..N across the shards")


@pytest.mark.parametrize(
    ("second", "parts"),
    [
        ([6, 7, 8, 9, 11, 12, 13], "row 5 (1-based) has Pid 11 where Pid 10 was expected"),
        ([6, 7, 8, 9, 9, 10, 11], "row 5 (1-based) has Pid 9 where Pid 10 was expected"),
        ([6, 7, 8, 10, 9, 11, 12], "row 4 (1-based) has Pid 10 where Pid 9 was expected"),
    ],
    ids=["gap", "duplicate", "swapped"],
)
def test_pid_problems_inside_a_later_row_group_name_the_row_in_the_shard(tmp_path, second, parts):
    """Rows are counted within the shard, across its row groups (here of 3 rows each)."""
    shards = [_sparse_shard([1, 2, 3, 4, 5]), _sparse_shard(second)]
    _refused(_parquet_hub(tmp_path, shards, n=N), f"part-00001.parquet: {parts}")


def test_null_pid_is_named(tmp_path):
    table = _sparse_shard(list(range(1, N + 1)))
    pids = pa.array([*range(1, 8), None, *range(9, N + 1)], pa.int64())
    table = table.set_column(0, "Pid", pids)
    _refused(_parquet_hub(tmp_path, [table]), "part-00000.parquet: row 8 (1-based) has no Pid (null)")


def _with_column(table: pa.Table, name: str, column: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, column)
    return table.append_column(name, column)


def _dense(width: int = DIM, strings: bool = False) -> pa.Array:
    flat = pa.array(["1"] * (N * width)) if strings else pa.array(np.ones(N * width, np.float32))
    return pa.FixedSizeListArray.from_arrays(flat, width)


BAD_COLUMNS = {
    "pid-string": ("Pid", pa.array([str(p) for p in range(1, N + 1)]), "column 'Pid' has type string; expected int64"),
    "pid-float": ("Pid", pa.array(np.arange(1.0, N + 1)), "column 'Pid' has type double; expected int64"),
    "pid-uint64": ("Pid", pa.array(np.arange(1, N + 1, dtype=np.uint64)), "column 'Pid' has type uint64"),
    "indices-floats": (
        "indices",
        pa.array([[0.0, 1.0]] * N, pa.list_(pa.float32())),
        "column 'indices' has type list<element: float>; expected list<int32>",
    ),
    "indices-scalar": ("indices", pa.array(np.zeros(N, np.int32)), "column 'indices' has type int32"),
    "indices-fixed-size": (
        "indices",
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(2 * N, np.int32)), 2),
        "column 'indices' has type fixed_size_list<element: int32>[2]",
    ),
    "values-strings": ("values", pa.array([["1", "1"]] * N), "column 'values' has type list<element: string>"),
    "values-scalar": ("values", pa.array(np.ones(N, np.float32)), "column 'values' has type float; expected list"),
}


@pytest.mark.parametrize("case", sorted(BAD_COLUMNS))
def test_wrong_sparse_column_types_are_named(tmp_path, case):
    name, column, part = BAD_COLUMNS[case]
    table = _with_column(_sparse_shard(list(range(1, N + 1))), name, column)
    _refused(_parquet_hub(tmp_path, [table]), f"part-00000.parquet: {part}")


@pytest.mark.parametrize(
    ("column", "part"),
    [
        (_dense(DIM + 1), "fixed_size_list<element: float>[10]; expected fixed_size_list<float32>[9]"),
        (pa.array([[1.0] * DIM] * N, pa.list_(pa.float32())), "list<element: float>; expected fixed_size_list"),
        (_dense(DIM, strings=True), "fixed_size_list<element: string>[9]"),
    ],
    ids=["wrong-width", "variable-size-list", "strings"],
)
def test_wrong_dense_column_types_are_named(tmp_path, column, part):
    table = pa.table({"Pid": pa.array(np.arange(1, N + 1)), "features": column})
    _refused(_parquet_hub(tmp_path, [table]), f"part-00000.parquet: column 'features' has type {part}")


def test_dense_parquet_loads(tmp_path):
    table = pa.table({"Pid": pa.array(np.arange(1, N + 1)), "features": _dense()})
    assert _load(_parquet_hub(tmp_path, [table])).num_pois == N


def test_missing_columns_and_mixed_layouts_are_named(tmp_path):
    table = _sparse_shard(list(range(1, N + 1))).rename_columns(["pid", "indices"])
    _refused(
        _parquet_hub(tmp_path / "a", [table]), "part-00000.parquet needs a 'Pid' column", "found ['indices', 'pid']"
    )
    dense = pa.table({"Pid": pa.array(np.arange(6, N + 1)), "features": _dense()[5:]})
    _refused(
        _parquet_hub(tmp_path / "b", [_sparse_shard([1, 2, 3, 4, 5]), dense]),
        "part-00001.parquet has the columns {Pid: int64, features: fixed_size_list<element: float>[9]} but "
        "part-00000.parquet has {Pid: int64, indices: list<element: int32>}; every shard must have the same columns",
    )
    narrow = _sparse_shard(list(range(6, N + 1))).cast(
        pa.schema([("Pid", pa.int32()), ("indices", pa.list_(pa.int32()))])
    )
    _refused(
        _parquet_hub(tmp_path / "c", [_sparse_shard([1, 2, 3, 4, 5]), narrow]),
        "part-00001.parquet has the columns {Pid: int32, indices: list<element: int32>} but part-00000.parquet has "
        "{Pid: int64, indices: list<element: int32>}",
    )


@pytest.mark.parametrize(("bad", "shown"), [(DIM, f"[0, {DIM}]"), (-1, "[-1, 7]")], ids=["too-large", "negative"])
def test_indices_out_of_range_name_shard_and_rows(tmp_path, bad, shown):
    table = _sparse_shard([6, 7, 8, 9, 10, 11, 12])
    lists = table.column("indices").to_pylist()
    lists[4] = sorted([*lists[4], bad])  # row 5: the second row group (rows 4-6)
    table = table.set_column(1, "indices", pa.array(lists, pa.list_(pa.int32())))
    _refused(
        _parquet_hub(tmp_path, [_sparse_shard([1, 2, 3, 4, 5]), table]),
        f"part-00001.parquet: 'indices' in rows 4-6 range over {shown}, outside [0, {DIM}) of total_dim",
    )


def test_indices_range_is_not_checked_without_statistics(tmp_path):
    table = _sparse_shard(list(range(1, N + 1)))
    table = table.set_column(1, "indices", pa.array([[0, DIM + 5]] * N, pa.list_(pa.int32())))
    assert _load(_parquet_hub(tmp_path, [table], write_statistics=False)).num_pois == N  # the encoder refuses later


def test_unreadable_or_empty_parquet_is_named(tmp_path):
    hub = _parquet_hub(tmp_path / "a", _shards((1, 5), (6, 12)))
    (_base(hub) / FEATURES_PARQUET_DIR / "part-00001.parquet").write_bytes(b"PAR1 but not really")
    _refused(hub, "part-00001.parquet is not a readable Parquet file")
    _refused(_parquet_hub(tmp_path / "b", [_sparse_shard([])], n=0), "the Parquet shards hold no rows (0 POIs)")


def test_parquet_metadata_and_mapping_are_checked(tmp_path):
    hub = _parquet_hub(tmp_path / "a", _shards((1, 12)))
    (_base(hub) / METADATA_FILE).write_text(json.dumps({"total_dim": DIM, "num_pois": 11}))
    _refused(hub, "num_pois 11 but the features have 12 rows")
    hub = _parquet_hub(tmp_path / "b", _shards((1, 12)))
    _mapping_text(hub, "Original_Pid,Mapped_Pid\n" + "".join(f"{o},{p}\n" for o, p in _mapping(11)))
    _refused(hub, "pid_mapping.csv has 11 rows but the features have 12")


# ---- Arrow rows ---------------------------------------------------------------------------------------------------


def test_sparse_table_round_trips(tmp_path):
    features = _features()
    weighted = features * np.linspace(0.5, 2.0, DIM, dtype=np.float32)
    for dense in (features, weighted):
        rows = SparseRows.from_dense(dense)
        table = sparse_table(rows, first_pid=101)
        assert table.column("Pid").to_pylist() == list(range(101, 101 + N))
        assert table.schema.field("indices").type == pa.list_(pa.int32())
        back = rows_from_table(table)
        np.testing.assert_array_equal(back.indptr, rows.indptr)
        np.testing.assert_array_equal(back.indices, rows.indices)
        if rows.values is None:
            assert back.values is None and "values" not in table.column_names
        else:
            np.testing.assert_array_equal(back.values, rows.values)
        # A slice (non-zero first offset), as Ray Data hands to an actor.
        part = rows_from_table(table.slice(4, 5))
        np.testing.assert_array_equal(part.indptr, rows.indptr[4:10] - rows.indptr[4])
        np.testing.assert_array_equal(part.indices, rows.indices[rows.indptr[4] : rows.indptr[9]])


def test_dense_table_gives_the_same_rows():
    features = _features()
    flat = pa.array(features.ravel())
    table = pa.table({"Pid": pa.array(np.arange(1, N + 1)), "features": pa.FixedSizeListArray.from_arrays(flat, DIM)})
    back, rows = rows_from_table(table), SparseRows.from_dense(features)
    np.testing.assert_array_equal(back.indptr, rows.indptr)
    np.testing.assert_array_equal(back.indices, rows.indices)
    assert back.values is None


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_values_in_rows_name_the_pid(value):
    rows = SparseRows.from_dense(_features() * 2.0)
    rows.values[rows.indptr[6] + 1] = value  # row 6 of the table
    with pytest.raises(DatasetError, match=r"NaN or Inf \(first at Pid 57\)"):
        rows_from_table(sparse_table(rows, first_pid=51))
    dense = _features()
    dense[9, 2] = value
    table = pa.table(
        {
            "Pid": pa.array(np.arange(1, N + 1)),
            "features": pa.FixedSizeListArray.from_arrays(pa.array(dense.ravel()), DIM),
        }
    )
    with pytest.raises(DatasetError, match=r"NaN or Inf \(first at Pid 10\)"):
        rows_from_table(table)


def test_values_of_another_length_than_indices_are_refused():
    table = _sparse_shard(list(range(1, N + 1)))
    table = table.append_column("values", pa.array([[1.0]] * N, pa.list_(pa.float32())))
    with pytest.raises(DatasetError, match="as many entries as its 'indices'"):
        rows_from_table(table)
