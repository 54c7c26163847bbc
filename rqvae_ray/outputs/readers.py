"""Readers of published codebooks files (``Pid, Codebook, Vector[, SID]``), CSV or Parquet alike.

The format is decided by content (a Parquet file starts with ``PAR1``), never by the name. Both formats are read
through pyarrow in batches and give the same Arrow types: ``Pid`` int64, ``Codebook`` list<int32> (with ``--dedup``
some lists carry one more code), ``Vector`` fixed_size_list<float32>[d] and, when present, ``SID`` string. CSV floats
are the shortest decimals that round-trip to float32 and are parsed straight to float32, so both formats give the
same bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from rqvae_ray.errors import CodebooksFileError

LAYOUTS = (("Pid", "Codebook", "Vector"), ("Pid", "Codebook", "Vector", "SID"))
PARQUET_MAGIC = b"PAR1"
CSV_BLOCK_BYTES = 1 << 20  # pyarrow reads ahead ~32 blocks, so this bounds a CSV reader to ~32 MiB of text
HEADER_BLOCK_BYTES = 1 << 16  # enough to read the header (and a first row) when opening
_LIST_ELEMENTS = {"Codebook": pa.int32(), "Vector": pa.float32()}
_CSV_TYPES = {"Pid": pa.int64(), "Codebook": pa.string(), "Vector": pa.string(), "SID": pa.string()}


def iter_codebooks(
    path: str | Path, batch_rows: int = 65536, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """The file's rows as record batches of ``batch_rows`` rows (the last one shorter; none for a file without
    rows), in file order; ``columns`` reads only those of the file's columns (the CSV parser then skips converting
    the others, e.g. the costly Vector)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be at least 1, got {batch_rows}")
    source = _Source(Path(path))
    wanted = source.columns if columns is None else tuple(columns)
    missing = [name for name in wanted if name not in source.columns]
    if missing:
        raise CodebooksFileError(str(path), f"has no column {missing[0]!r} (columns: {', '.join(source.columns)})")
    return source.batches(batch_rows, wanted)


def read_codebooks(path: str | Path) -> pd.DataFrame:
    """A whole codebooks file as a DataFrame: ``Pid`` int64, ``Codebook`` (lists of int), ``Vector`` (float32
    arrays of the latent width) and ``SID`` (str) when the file has it."""
    source = _Source(Path(path))
    batches = list(source.batches(65536, source.columns))
    table = pa.Table.from_batches(batches) if batches else _schema(source.columns, 0).empty_table()
    vector = table.column("Vector").combine_chunks()
    # One float32 array of all rows; each cell is a view of its row.
    matrix = vector.flatten().to_numpy().reshape(len(vector), vector.type.list_size)
    frame = {
        "Pid": pd.Series(table.column("Pid").to_numpy(), dtype=np.int64),
        "Codebook": pd.Series(table.column("Codebook").to_pylist(), dtype=object),
        "Vector": pd.Series(list(matrix), dtype=object),
    }
    if "SID" in source.columns:
        frame["SID"] = table.column("SID").to_pandas()
    return pd.DataFrame(frame)


def _schema(columns: Sequence[str], width: int) -> pa.Schema:
    types = {
        "Pid": pa.int64(),
        "Codebook": pa.list_(pa.int32()),
        "Vector": pa.list_(pa.float32(), width),
        "SID": pa.string(),
    }
    return pa.schema([(name, types[name]) for name in columns])


class _Source:
    """One codebooks file: its format and columns, checked on opening."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as handle:
                magic = handle.read(len(PARQUET_MAGIC))
        except FileNotFoundError:
            raise CodebooksFileError(str(path), "no such file") from None
        except OSError as exc:
            raise CodebooksFileError(str(path), f"cannot be read ({exc.strerror})") from None
        if not magic:
            raise CodebooksFileError(str(path), "is empty; a codebooks file starts with the header Pid,Codebook,Vector")
        self.parquet = magic == PARQUET_MAGIC
        if self.parquet:
            names = self._parquet_file().schema_arrow.names
        else:
            names = self._csv_reader(None, HEADER_BLOCK_BYTES).schema.names
        if tuple(names) not in LAYOUTS:
            expected = " or ".join(",".join(layout) for layout in LAYOUTS)
            raise CodebooksFileError(str(path), f"has columns {','.join(names)}; a codebooks file has {expected}")
        self.columns: tuple[str, ...] = tuple(names)

    def batches(self, batch_rows: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        if self.parquet:
            raw = self._parquet_file().iter_batches(batch_size=batch_rows, columns=list(columns))
        else:
            raw = self._csv_reader(columns, CSV_BLOCK_BYTES)
        return _rebatched(self._converted(raw), batch_rows)

    def _parquet_file(self) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as exc:
            raise CodebooksFileError(str(self.path), f"is not a readable Parquet file ({_first_line(exc)})") from None

    def _csv_reader(self, columns: Sequence[str] | None, block_bytes: int) -> pa_csv.CSVStreamingReader:
        try:
            return pa_csv.open_csv(
                self.path,
                read_options=pa_csv.ReadOptions(block_size=block_bytes),
                convert_options=pa_csv.ConvertOptions(
                    column_types=_CSV_TYPES, include_columns=None if columns is None else list(columns)
                ),
            )
        except (pa.ArrowException, OSError) as exc:
            raise CodebooksFileError(str(self.path), f"is not a readable CSV file ({_first_line(exc)})") from None

    def _converted(self, raw: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Each batch in the common Arrow types, checked; every Vector of the file must have the same width."""
        first_row, width = 0, None
        try:
            for batch in raw:
                if not batch.num_rows:
                    continue
                converted = pa.RecordBatch.from_arrays(
                    [self._typed(name, batch.column(name), first_row) for name in batch.schema.names],
                    names=batch.schema.names,
                )
                if "Vector" in converted.schema.names:
                    this_width = converted.schema.field("Vector").type.list_size
                    if width is not None and this_width != width:
                        reason = f"row {first_row + 1} has a Vector of {this_width} floats, the rows before {width}"
                        raise CodebooksFileError(str(self.path), reason)
                    width = this_width
                yield converted
                first_row += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            where = f"after row {first_row}" if first_row else "in its first rows"
            raise CodebooksFileError(str(self.path), f"cannot be read {where} ({_first_line(exc)})") from None

    def _typed(self, name: str, column: pa.Array, first_row: int) -> pa.Array:
        """``column`` (rows from ``first_row`` on) in its common type, CSV list text parsed; nulls and ragged
        Vectors are refused."""
        if column.null_count:
            row = first_row + 1 + pc.index(pc.is_null(column), True).as_py()
            raise CodebooksFileError(str(self.path), f"row {row} has an empty {name}")
        if name in _LIST_ELEMENTS and pa.types.is_string(column.type):
            column = self._parsed_list(name, column, first_row)
        if name == "Vector":
            lengths = pc.list_value_length(column)
            other = pc.index(pc.not_equal(lengths, lengths[0]), True).as_py()
            if other >= 0:
                reason = (
                    f"row {first_row + 1 + other} has a Vector of {lengths[other]} floats, row {first_row + 1} "
                    f"of {lengths[0]}"
                )
                raise CodebooksFileError(str(self.path), reason)
            target = pa.list_(pa.float32(), lengths[0].as_py())
        else:
            target = _schema([name], 0).field(name).type
        if column.type == target:
            return column
        try:
            return column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise CodebooksFileError(str(self.path), f"has a {name} of type {column.type}, expected {target}") from None

    def _parsed_list(self, name: str, text: pa.Array, first_row: int) -> pa.Array:
        """CSV list text (``"[1, 2, 3]"``) as an Arrow list of the column's element type."""
        kind = "integers" if name == "Codebook" else "floats"
        unbracketed = pc.index(pc.and_(pc.starts_with(text, "["), pc.ends_with(text, "]")), False).as_py()
        if unbracketed >= 0:
            row = first_row + 1 + unbracketed
            raise CodebooksFileError(str(self.path), f"row {row} has a {name} that is not a [...] list of {kind}")
        parts = pc.split_pattern(pc.utf8_slice_codeunits(text, 1, -1), ",")
        try:
            values = pc.ascii_trim_whitespace(parts.flatten()).cast(_LIST_ELEMENTS[name])
        except pa.ArrowInvalid:
            rows = f"rows {first_row + 1}-{first_row + len(text)}"
            raise CodebooksFileError(str(self.path), f"has a {name} in {rows} that is not a list of {kind}") from None
        return pa.ListArray.from_arrays(parts.offsets, values)


def _rebatched(batches: Iterable[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows in batches of exactly ``batch_rows`` rows, the last one shorter."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(batch_rows - held, batch.num_rows)
            pending.append(batch.slice(0, take))
            held += take
            batch = batch.slice(take)
            if held == batch_rows:
                yield _joined(pending)
                pending, held = [], 0
    if held:
        yield _joined(pending)


def _joined(batches: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(batches) == 1:
        return batches[0]
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
