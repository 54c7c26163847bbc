"""POI features: loading, validating, and turning them into a Ray Dataset of sparse rows in Pid order."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rqvae_ray.encoder import SparseRows
from rqvae_ray.errors import DatasetError
from rqvae_ray.stores import DatasetFiles


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


def _sha256_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_dense_features(path: Path, repo: str) -> np.ndarray:
    """Read ``poi_features.pt`` safely into a float32 [N, D] array."""
    import pickle

    import torch

    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DatasetError(repo, f"{path.name} holds Python objects, not a tensor; refused to load it") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise DatasetError(repo, f"{path.name} is corrupt or truncated ({str(exc)[:120]}); re-download it") from None
    if isinstance(tensor, dict) and len(tensor) == 1:
        tensor = next(iter(tensor.values()))
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        shape = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise DatasetError(repo, f"{path.name} must hold a 2-D tensor [POIs, features], found {shape}")
    if tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.uint8, torch.bool):
        return tensor.to(torch.float32).numpy()
    raise DatasetError(repo, f"{path.name} has dtype {tensor.dtype}; expected a float tensor")


def check_finite(values: np.ndarray, repo: str) -> None:
    """Reject NaN/Inf features, naming the first offending row's Pid."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DatasetError(repo, f"features contain NaN or Inf (first at Pid {row + 1}); fix the feature file")


def _check_metadata(files: DatasetFiles, num_pois: int, dim: int) -> None:
    if files.metadata is None:
        raise DatasetError(files.repo, "'RQVAE Dataset/metadata.json' is missing; restore it (it holds total_dim)")
    try:
        meta = json.loads(files.metadata.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(files.repo, f"metadata.json is not valid JSON ({exc}); restore it") from None
    if not isinstance(meta, dict) or "total_dim" not in meta:
        raise DatasetError(files.repo, "metadata.json has no 'total_dim'; restore it")
    if int(meta["total_dim"]) != dim:
        raise DatasetError(
            files.repo,
            f"metadata.json says total_dim {meta['total_dim']} but the features have {dim} columns; "
            "the two files come from different builds, re-download both",
        )
    if "num_pois" in meta and int(meta["num_pois"]) != num_pois:
        raise DatasetError(
            files.repo, f"metadata.json says num_pois {meta['num_pois']} but the features have {num_pois} rows"
        )


def check_pid_mapping(files: DatasetFiles, num_pois: int) -> None:
    """The Pid mapping must list each Mapped_Pid 1..N exactly once."""
    if files.pid_mapping is None:
        raise DatasetError(files.repo, "'Intermediate Files/pid_mapping.csv' is missing; restore it")
    try:
        with files.pid_mapping.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or "Mapped_Pid" not in reader.fieldnames:
                raise DatasetError(files.repo, "pid_mapping.csv has no 'Mapped_Pid' column; restore it")
            mapped = np.array([int(row["Mapped_Pid"]) for row in reader], dtype=np.int64)
    except (OSError, ValueError, TypeError) as exc:
        if isinstance(exc, DatasetError):
            raise
        raise DatasetError(files.repo, f"pid_mapping.csv is unreadable ({exc}); restore it") from None
    if len(mapped) != num_pois:
        raise DatasetError(
            files.repo,
            f"pid_mapping.csv has {len(mapped)} rows but the features have {num_pois}; they come from different builds",
        )
    values, counts = np.unique(mapped, return_counts=True)
    if (counts > 1).any():
        raise DatasetError(
            files.repo, f"pid_mapping.csv repeats Mapped_Pid {int(values[counts > 1][0])}; each Pid must be unique"
        )
    if len(values) and (values[0] != 1 or values[-1] != num_pois):
        raise DatasetError(files.repo, f"pid_mapping.csv Mapped_Pid must run 1..{num_pois}")


def _metadata_dim(files: DatasetFiles) -> int:
    if files.metadata is None:
        raise DatasetError(files.repo, "'RQVAE Dataset/metadata.json' is missing; restore it (it holds total_dim)")
    try:
        return int(json.loads(files.metadata.read_text())["total_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(files.repo, f"metadata.json has no readable 'total_dim' ({exc}); restore it") from None


def _load_parquet(files: DatasetFiles) -> PoiFeatures:
    import pyarrow.parquet as pq

    num_pois = 0
    dim = _metadata_dim(files)
    for shard in files.features:
        try:
            parquet = pq.ParquetFile(shard)
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(files.repo, f"{shard.name} is not a readable Parquet file ({exc})") from None
        names = set(parquet.schema_arrow.names)
        if "Pid" not in names or not ({"indices", "features"} & names):
            raise DatasetError(
                files.repo,
                f"{shard.name} needs a 'Pid' column and 'indices' (sparse) or 'features' (dense); "
                f"found {sorted(names)}",
            )
        num_pois += parquet.metadata.num_rows
    if num_pois == 0:
        raise DatasetError(files.repo, "the Parquet shards hold no rows (0 POIs); nothing to encode")
    return _validated(files, num_pois, dim, shards=tuple(str(p) for p in files.features))


def _validated(files: DatasetFiles, num_pois: int, dim: int, **data) -> PoiFeatures:
    """Check metadata.json and pid_mapping.csv against the features, then describe the dataset."""
    _check_metadata(files, num_pois, dim)
    check_pid_mapping(files, num_pois)
    return PoiFeatures(
        repo=files.repo,
        dim=dim,
        num_pois=num_pois,
        sha256=_sha256_files(files.features),
        revision=files.revision,
        **data,
    )


def load_features(files: DatasetFiles) -> PoiFeatures:
    """Load and validate a dataset: ``poi_features.pt`` into memory, or the Parquet shards' metadata."""
    if files.is_parquet:
        return _load_parquet(files)
    dense = load_dense_features(files.features[0], files.repo)
    num_pois, dim = dense.shape
    if num_pois == 0:
        raise DatasetError(files.repo, "the feature tensor is empty (0 POIs); nothing to encode")
    check_finite(dense, files.repo)
    return _validated(files, num_pois, dim, rows=SparseRows.from_dense(dense))


def sparse_table(rows: SparseRows, first_pid: int = 1) -> pa.Table:
    """Arrow table ``Pid`` int64, ``indices`` list<int32>[, ``values`` list<float32>] of sparse rows."""
    offsets = pa.array(rows.indptr.astype(np.int32))
    columns = {
        "Pid": pa.array(np.arange(first_pid, first_pid + rows.num_rows, dtype=np.int64)),
        "indices": pa.ListArray.from_arrays(offsets, pa.array(rows.indices.astype(np.int32))),
    }
    if rows.values is not None:
        columns["values"] = pa.ListArray.from_arrays(offsets, pa.array(rows.values.astype(np.float32)))
    return pa.table(columns)


def rows_from_table(table: pa.Table) -> SparseRows:
    """Inverse of :func:`sparse_table`; also accepts a dense ``features`` fixed-size-list column.

    Raises :class:`DatasetError` for NaN/Inf values, so that bad rows streamed from Parquet stop the dataset.
    """
    if "indices" in table.column_names:
        column = table.column("indices").combine_chunks()
        start = column.offsets[0].as_py() if len(column) else 0
        indptr = column.offsets.to_numpy().astype(np.int64) - start
        indices = column.flatten().to_numpy().astype(np.int64)
        values = None
        if "values" in table.column_names:
            values = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            values = values.astype(np.float32)
            if len(values) != len(indices):
                raise DatasetError("", "each row's 'values' must have as many entries as its 'indices'")
            bad = np.flatnonzero(~np.isfinite(values))
            if len(bad):
                _reject_row(table, int(np.searchsorted(indptr, bad[0], side="right")) - 1)
        return SparseRows(indptr, indices, values)
    column = table.column("features").combine_chunks()
    width = column.type.list_size
    dense = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    bad = np.argwhere(~np.isfinite(dense))
    if len(bad):
        _reject_row(table, int(bad[0][0]))
    return SparseRows.from_dense(dense)


def _reject_row(table: pa.Table, row: int) -> None:
    pid = table.column("Pid")[row].as_py()
    raise DatasetError("", f"features contain NaN or Inf (first at Pid {pid}); fix the feature files")


def to_ray_dataset(features: PoiFeatures, block_rows: int):
    """A Ray Dataset of the rows in Pid order (``block_rows`` POIs per in-memory block).

    Parquet shards are read by tasks pinned to the driver's node (where the files are) and travel to the encoder
    actors through the object store.
    """
    import ray
    import ray.data
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if features.shards:
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        with warnings.catch_warnings():
            # read_parquet has no named parameter for a scheduling strategy yet; ray_remote_args is the way.
            warnings.simplefilter("ignore", DeprecationWarning)
            shards = ray.data.read_parquet(list(features.shards), ray_remote_args={"scheduling_strategy": here})
        # A shard is one block of ~250k rows; smaller blocks keep every actor's memory small and flat in N.
        return shards.repartition(target_num_rows_per_block=block_rows)
    rows = features.rows
    tables = []
    for start in range(0, features.num_pois, block_rows):
        stop = min(start + block_rows, features.num_pois)
        lo, hi = rows.indptr[start], rows.indptr[stop]
        part = SparseRows(
            rows.indptr[start : stop + 1] - lo,
            rows.indices[lo:hi],
            None if rows.values is None else rows.values[lo:hi],
        )
        tables.append(sparse_table(part, first_pid=start + 1))
    return ray.data.from_arrow(tables)
