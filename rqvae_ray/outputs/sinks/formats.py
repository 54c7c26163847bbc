"""The two file formats of a codebooks file: rows of known codes in, bytes out through the hashing file."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from rqvae_ray.core.contract import EncodedColumns, OutputSpec
from rqvae_ray.core.encoder import codeword_sums
from rqvae_ray.core.formatting import (
    CSV_HEADER,
    CSV_HEADER_WITH_SID,
    arrow_columns,
    csv_lines,
    string_buffers,
    with_dedup_codes,
    with_dedup_tokens,
)
from rqvae_ray.outputs.staging import HashingFile

PARQUET_ROW_GROUP_ROWS = 1 << 16


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class CsvFormat:
    """``Pid,Codebook,Vector[,SID]`` lines: finished by the encode stage, or completed here with the dedup codes."""

    needs_codes = False

    def __init__(self, handle: HashingFile, spec: OutputSpec, levels: int) -> None:
        self.handle = handle
        self.levels = levels
        self.header = CSV_HEADER_WITH_SID if spec.sid_tokens else CSV_HEADER

    def start(self) -> None:
        self.handle.write(self.header)

    def write(self, pids: pa.ChunkedArray, encoded: EncodedColumns, codes: np.ndarray | None, extra) -> None:
        if encoded.lines is not None:
            self.handle.writelines(string_buffers(encoded.lines))  # Arrow's memory (the object store's, on Ray)
            return
        parts = {
            k: _whole(v)
            for k, v in (("head", encoded.head), ("tail", encoded.tail), ("tokens", encoded.tokens))
            if v is not None
        }
        self.handle.writelines(string_buffers(csv_lines(parts, extra, self.levels)))

    def close(self) -> None:
        pass


class ParquetFormat:
    """``Pid`` int64, ``Codebook`` list<int32>, ``Vector`` fixed_size_list<float32>[levels' width][, ``SID``],
    built from the codes (the Vector is the sum of the codewords), in row groups of a fixed size."""

    needs_codes = True

    def __init__(self, handle: HashingFile, spec: OutputSpec, levels: int, codebooks: tuple[np.ndarray, ...]) -> None:
        self.handle = handle
        self.sid_tokens = spec.sid_tokens
        self.levels = levels
        self.codebooks = codebooks
        self._writer = None
        self._held: list[pa.Table] = []  # rows not yet written as a row group
        self._held_rows = 0

    def start(self) -> None:
        pass

    def write(self, pids: pa.ChunkedArray, encoded: EncodedColumns, codes: np.ndarray, extra) -> None:
        built = arrow_columns(pids.to_numpy(), codes, codeword_sums(self.codebooks, codes))
        columns = {
            "Pid": pids,
            "Codebook": built["Codebook"] if extra is None else with_dedup_codes(built["Codebook"], extra),
            "Vector": built["Vector"],
        }
        if self.sid_tokens:
            tokens = _whole(encoded.tokens)
            columns["SID"] = tokens if extra is None else with_dedup_tokens(tokens, extra, self.levels)
        self.write_table(pa.table(columns))

    def write_table(self, table: pa.Table) -> None:
        """Append finished rows (also those kept from an existing file)."""
        import pyarrow.parquet as pq

        if self._writer is None:
            # Dictionary encoding is retried for every row group and costs ~8x the CPU of the plain encoding on
            # the float Vector column, for a larger file; only the SID strings repeat enough to gain from it.
            dictionary = ["SID"] if self.sid_tokens else False
            self._writer = pq.ParquetWriter(self.handle, table.schema, use_dictionary=dictionary)
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)
        # Row groups of a fixed size, whatever the blocks: the file's bytes depend on its rows alone (the plan, the
        # blocks the executor makes, or resuming an interrupted run change nothing).
        self._held.append(table)
        self._held_rows += table.num_rows
        while self._held_rows >= PARQUET_ROW_GROUP_ROWS:
            self._flush(PARQUET_ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        held = pa.concat_tables(self._held)
        # One chunk per column: pages are cut where the chunks are fed in, so the chunks must not depend on the blocks.
        self._writer.write_table(held.slice(0, rows).combine_chunks(), row_group_size=rows)
        self._held, self._held_rows = [held.slice(rows)], self._held_rows - rows

    def close(self) -> None:
        if self._writer is None:
            return
        if self._held_rows:
            self._flush(self._held_rows)
        self._writer.close()
        self._writer = None
