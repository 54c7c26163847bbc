"""POI features: loading, validating, and turning them into a Ray Dataset of sparse rows in Pid order."""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.core.rows import pid_break
from rqvae_ray.errors import DatasetError
from rqvae_ray.inputs.decoded_cache import DecodedCache, DecodedFeatures
from rqvae_ray.inputs.stores import DatasetFiles

if TYPE_CHECKING:
    import pyarrow.parquet as pq


@dataclass(frozen=True)
class PoiFeatures:
    """A validated dataset (row ``i`` is Pid ``i + 1``): sparse rows in memory, or Parquet shards read in order."""

    repo: str
    dim: int
    num_pois: int
    sha256: str
    revision: str
    rows: SparseRows | None = None
    shards: tuple[str, ...] = ()
    shard_first_pids: tuple[int, ...] = ()  # the Pid of each shard's first row


def load_dense_features(path: Path, repo: str) -> np.ndarray:
    """Read ``poi_features.pt`` safely as a float32 [N, D] array, memory-mapped where the file allows."""
    import pickle

    import torch

    try:
        # A zip archive (torch.save's format since 1.6) is memory-mapped: its pages are read as the sparse rows are
        # built, never copied whole into this process; a legacy file can only be read whole.
        mmap = zipfile.is_zipfile(path)
        tensor = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        if not zipfile.is_zipfile(path):  # not a torch archive at all: the unpickler met garbage, not an object
            raise DatasetError(
                repo, f"{path.name} is not a torch.save archive (corrupt or truncated); re-download it"
            ) from None
        raise DatasetError(repo, f"{path.name} holds Python objects, not a tensor; refused to load it") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise DatasetError(repo, f"{path.name} is corrupt or truncated ({str(exc)[:120]}); re-download it") from None
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        raise DatasetError(
            repo,
            f"{path.name} must hold a 2-D tensor [POIs, features], found {_describe(tensor)}; "
            "save the tensor itself with torch.save(tensor, path)",
        )
    if tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
        return tensor.to(torch.float32).numpy()  # no copy when it is float32 already: the mapped pages themselves
    raise DatasetError(repo, f"{path.name} has dtype {tensor.dtype}; expected a float tensor")


def _describe(value: object) -> str:
    """What a loaded ``.pt`` holds, briefly: a tensor's shape and dtype, a dict's keys and values, else the type."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a {value.ndim}-D tensor {list(value.shape)} ({value.dtype})"
    if isinstance(value, dict):
        items = [f"{key!r}: {_describe(item)}" for key, item in list(value.items())[:4]]
        more = f", ... ({len(value)} keys)" if len(value) > 4 else ""
        return "a dict {" + ", ".join(items) + more + "}"
    return f"a {type(value).__name__}"


def check_finite(values: np.ndarray, repo: str, chunk_rows: int = 65536) -> None:
    """Reject NaN/Inf features, naming the first offending row's Pid (checked a chunk of rows at a time, so that a
    memory-mapped file is never copied whole)."""
    for start in range(0, len(values), chunk_rows):
        bad = ~np.isfinite(values[start : start + chunk_rows])
        if bad.any():
            row = start + int(np.argwhere(bad)[0][0])
            raise DatasetError(repo, f"features contain NaN or Inf (first at Pid {row + 1}); fix the feature file")


@dataclass(frozen=True)
class _Metadata:
    total_dim: int
    num_pois: int | None


def _read_metadata(files: DatasetFiles) -> _Metadata:
    """``total_dim`` (required, positive) and ``num_pois`` (optional, non-negative) of metadata.json."""
    if files.metadata is None:
        raise DatasetError(files.repo, "'RQVAE Dataset/metadata.json' is missing; restore it (it holds total_dim)")
    try:
        meta = json.loads(files.metadata.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(files.repo, f"metadata.json is not valid JSON ({exc}); restore it") from None
    if not isinstance(meta, dict) or "total_dim" not in meta:
        raise DatasetError(files.repo, "metadata.json has no 'total_dim'; restore it")
    for key, least in (("total_dim", 1), ("num_pois", 0)):
        value = meta.get(key, least)
        if type(value) is not int or value < least:
            raise DatasetError(files.repo, f"metadata.json has {key} {value!r}; expected an integer >= {least}")
    return _Metadata(meta["total_dim"], meta.get("num_pois"))


def _check_metadata(files: DatasetFiles, meta: _Metadata, num_pois: int, dim: int) -> None:
    if meta.total_dim != dim:
        raise DatasetError(
            files.repo,
            f"metadata.json says total_dim {meta.total_dim} but the features have {dim} columns; "
            "the two files come from different builds, re-download both",
        )
    if meta.num_pois is not None and meta.num_pois != num_pois:
        raise DatasetError(
            files.repo, f"metadata.json says num_pois {meta.num_pois} but the features have {num_pois} rows"
        )


def check_pid_mapping(files: DatasetFiles, num_pois: int) -> None:
    """The Pid mapping must list each Mapped_Pid 1..N exactly once (streamed; memory is one byte per POI)."""
    import pyarrow.csv as pacsv

    if files.pid_mapping is None:
        raise DatasetError(files.repo, "'Intermediate Files/pid_mapping.csv' is missing; restore it")
    seen = np.zeros(num_pois + 1, dtype=bool)
    rows, outside, repeated = 0, None, None
    try:
        # utf-8-sig: a byte order mark (as spreadsheet programs write) is not part of the first column's name.
        with files.pid_mapping.open(newline="", encoding="utf-8-sig") as handle:
            if "Mapped_Pid" not in next(csv.reader(handle), []):
                raise DatasetError(files.repo, "pid_mapping.csv has no 'Mapped_Pid' column; restore it")
        options = pacsv.ConvertOptions(include_columns=["Mapped_Pid"], column_types={"Mapped_Pid": pa.int64()})
        for batch in pacsv.open_csv(files.pid_mapping, convert_options=options):
            column = batch.column(0)
            if column.null_count:
                row = rows + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0]) + 1
                raise DatasetError(files.repo, f"pid_mapping.csv has an empty Mapped_Pid in data row {row}; fill it in")
            mapped = column.to_numpy()
            rows += len(mapped)
            bad = mapped[(mapped < 1) | (mapped > num_pois)]
            if len(bad) and outside is None:
                outside = int(bad[0])
            values, counts = np.unique(mapped[(mapped >= 1) & (mapped <= num_pois)], return_counts=True)
            twice = values[(counts > 1) | seen[values]]
            if len(twice) and repeated is None:
                repeated = int(twice[0])
            seen[values] = True
    except (OSError, UnicodeError, pa.ArrowException) as exc:
        raise DatasetError(files.repo, f"pid_mapping.csv is unreadable ({exc}); restore it") from None
    if rows != num_pois:
        raise DatasetError(
            files.repo,
            f"pid_mapping.csv has {rows} rows but the features have {num_pois}; they come from different builds",
        )
    if outside is not None:
        raise DatasetError(files.repo, f"pid_mapping.csv has Mapped_Pid {outside}; Mapped_Pid must run 1..{num_pois}")
    if repeated is not None:
        raise DatasetError(files.repo, f"pid_mapping.csv repeats Mapped_Pid {repeated}; each Pid must be unique")


def _load_parquet(files: DatasetFiles) -> PoiFeatures:
    """Check every shard (column types, index range from statistics, Pids 1..N in order) without reading features."""
    import pyarrow.parquet as pq

    meta = _read_metadata(files)
    columns: dict[str, pa.DataType] = {}
    next_pid = 1
    first_pids = []
    read: list[tuple[str, int, int]] = []  # the shards checked so far: (name, first Pid, last Pid)
    for shard in files.features:
        first_pids.append(next_pid)
        try:
            with pq.ParquetFile(shard) as parquet:
                shard_columns = _checked_columns(parquet.schema_arrow, shard.name, meta.total_dim, files.repo)
                if columns and shard_columns != columns:
                    raise DatasetError(
                        files.repo,
                        f"{shard.name} has the columns {_listed(shard_columns)} but {files.features[0].name} has "
                        f"{_listed(columns)}; every shard must have the same columns and types",
                    )
                columns = shard_columns
                next_pid = _check_row_groups(parquet, shard.name, meta.total_dim, next_pid, files.repo, read)
                read.append((shard.name, first_pids[-1], next_pid - 1))
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(files.repo, f"{shard.name} is not a readable Parquet file ({exc})") from None
    num_pois = next_pid - 1
    if num_pois == 0:
        raise DatasetError(files.repo, "the Parquet shards hold no rows (0 POIs); nothing to encode")
    shards = tuple(str(p) for p in files.features)
    return _validated(files, meta, num_pois, meta.total_dim, shards=shards, shard_first_pids=tuple(first_pids))


def _list_of(kind: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    """A check that an Arrow type is a variable-size list whose items pass ``kind``."""
    return lambda t: (pa.types.is_list(t) or pa.types.is_large_list(t)) and kind(t.value_type)


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _int64_compatible(t: pa.DataType) -> bool:
    return pa.types.is_signed_integer(t) or (pa.types.is_unsigned_integer(t) and t.bit_width < 64)


def _listed(columns: dict[str, pa.DataType]) -> str:
    return "{" + ", ".join(f"{name}: {kind}" for name, kind in columns.items()) + "}"


def _checked_columns(schema: pa.Schema, shard: str, dim: int, repo: str) -> dict[str, pa.DataType]:
    """The types of the columns the encoder reads (``Pid``, then ``indices`` [+ ``values``] or ``features``)."""
    types = {field.name: field.type for field in schema}
    if "Pid" not in types or not ({"indices", "features"} & set(types)):
        raise DatasetError(
            repo,
            f"{shard} needs a 'Pid' column and 'indices' (sparse) or 'features' (dense); found {sorted(types)}",
        )
    if "indices" in types:
        columns = ("indices", "values") if "values" in types else ("indices",)
    else:
        columns = ("features",)
    expected = {
        "Pid": (_int64_compatible, "int64"),
        "indices": (_list_of(pa.types.is_integer), "list<int32>"),
        "values": (_list_of(_numeric), "list<float32>"),
        "features": (
            lambda t: pa.types.is_fixed_size_list(t) and t.list_size == dim and _numeric(t.value_type),
            f"fixed_size_list<float32>[{dim}] (total_dim in metadata.json)",
        ),
    }
    for name in ("Pid", *columns):
        check, wanted = expected[name]
        if not check(types[name]):
            raise DatasetError(repo, f"{shard}: column '{name}' has type {types[name]}; expected {wanted}")
    return {name: types[name] for name in ("Pid", *columns)}


def _check_row_groups(
    parquet: pq.ParquetFile, shard: str, dim: int, first_pid: int, repo: str, read: list[tuple[str, int, int]]
) -> int:
    """Check each row group's ``indices`` range (from its statistics) and that its Pids continue from ``first_pid``
    (a Pid that a shard of ``read``, those before it, already holds names that shard too).

    Only the ``Pid`` column is read, one row group at a time. Returns the Pid the next shard must start with.
    """
    leaves = [i for i in range(parquet.metadata.num_columns) if parquet.schema.column(i).path.startswith("indices.")]
    expected = first_pid
    for group in range(parquet.metadata.num_row_groups):
        start = expected - first_pid  # rows of this shard before the group
        for leaf in leaves:
            stats = parquet.metadata.row_group(group).column(leaf).statistics
            if stats is not None and stats.has_min_max and (stats.min < 0 or stats.max >= dim):
                rows = parquet.metadata.row_group(group).num_rows
                raise DatasetError(
                    repo,
                    f"{shard}: 'indices' in rows {start + 1}-{start + rows} range over [{stats.min}, {stats.max}], "
                    f"outside [0, {dim}) of total_dim in metadata.json; fix the shard or metadata.json",
                )
        pids = parquet.read_row_group(group, columns=["Pid"]).column("Pid")
        if pids.null_count:
            row = start + int(np.flatnonzero(pids.is_null().to_numpy())[0]) + 1
            raise DatasetError(repo, f"{shard}: row {row} (1-based) has no Pid (null); every row needs its Pid")
        values = pids.to_numpy()
        broken = pid_break(values, expected)
        if broken is not None:
            at, wanted = broken
            raise DatasetError(
                repo,
                f"{shard}: row {start + at + 1} (1-based) has Pid {values[at]} where Pid {wanted} was expected; "
                "Pids must run 1..N across the shards in file-name order, with no gap, repeat or reordering"
                + _held_before(int(values[at]), read),
            )
        expected += len(values)
    return expected


def _held_before(pid: int, read: list[tuple[str, int, int]]) -> str:
    """The clause naming the shard read before that already holds ``pid`` (a stray copy, or a shard cut in two);
    "" when none does."""
    for name, first, last in read:
        if first <= pid <= last:
            return (
                f"; Pid {pid} is already in {name} (Pids {first}-{last}), read before it: if one of the two is a "
                "stray copy, remove it"
            )
    return ""


def _validated(
    files: DatasetFiles, meta: _Metadata, num_pois: int, dim: int, sha256: str | None = None, **data
) -> PoiFeatures:
    """Check metadata.json and pid_mapping.csv against the features, then describe the dataset (``sha256``: the
    features' digest when already computed)."""
    _check_metadata(files, meta, num_pois, dim)
    check_pid_mapping(files, num_pois)
    return PoiFeatures(
        repo=files.repo,
        dim=dim,
        num_pois=num_pois,
        sha256=sha256 or sha256_files(files.features),
        revision=files.revision,
        **data,
    )


def load_features(files: DatasetFiles, cache: DecodedCache | None = None) -> PoiFeatures:
    """Load and validate a dataset: ``poi_features.pt`` into memory (from ``cache`` when it holds the file's decoded
    rows, which are kept there otherwise), or the Parquet shards' metadata."""
    if files.is_parquet:
        return _load_parquet(files)
    sha256 = sha256_files(files.features)
    decoded = None if cache is None else cache.features(sha256)
    if decoded is None:
        decoded = _decode(files)
        if cache is not None:
            cache.keep_features(sha256, decoded)
    rows = decoded.rows
    return _validated(files, _read_metadata(files), rows.num_rows, decoded.dim, sha256, rows=rows)


def _decode(files: DatasetFiles) -> DecodedFeatures:
    """``poi_features.pt`` read with torch, checked and turned into sparse rows."""
    dense = load_dense_features(files.features[0], files.repo)
    num_pois, dim = dense.shape
    if num_pois == 0:
        raise DatasetError(files.repo, "the feature tensor is empty (0 POIs); nothing to encode")
    check_finite(dense, files.repo)
    return DecodedFeatures(SparseRows.from_dense(dense), dim)
