"""POI rows as they travel between stages: sparse rows and the Arrow tables that carry them (``Pid`` int64,
``indices`` list<int32>[, ``values`` list<float32>], or a dense ``features`` fixed-size list), and the one check that
rows run in Pid order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.errors import DatasetError


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


def pid_break(pids: np.ndarray, first: int) -> tuple[int, int] | None:
    """The first row of ``pids`` that breaks the run ``first, first + 1, ...`` and the Pid expected there; None when
    every row follows."""
    wrong = np.flatnonzero(np.asarray(pids) != np.arange(first, first + len(pids)))
    if not len(wrong):
        return None
    row = int(wrong[0])
    return row, first + row
