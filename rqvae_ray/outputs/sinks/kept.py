"""Rows a model's new file keeps from an existing one (``--keep-existing``): written as they are, in step with the
blocks, seeding the SID counts, dedup codes and exports; with ``verify`` each is checked against its fresh SID."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.core.rows import pid_break
from rqvae_ray.core.sid_stats import SidCounter, pack_codes
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.existing_rows import ExistingReader, ExistingRows
from rqvae_ray.outputs.sinks.formats import CsvFormat, ParquetFormat

KEEP_CHUNK_ROWS = 1 << 16


class KeptRows:
    """The existing rows of one file, and how many of them now get another SID (``changed``, first at Pid
    ``first_changed``); once one has, nothing more is written (the file will be refused)."""

    def __init__(
        self,
        existing: ExistingRows,
        spec: OutputSpec,
        sizes: tuple[int, ...],
        counter: SidCounter,
        fmt: CsvFormat | ParquetFormat,
        on_codes: Callable[[np.ndarray, np.ndarray], None] | None,
    ) -> None:
        self.existing = existing
        self.spec = spec
        self.sizes = sizes
        self.levels = len(sizes)
        self.counter = counter
        self.fmt = fmt
        self.on_codes = on_codes  # (Pids, codes) of each kept chunk, for the exports
        self.changed = 0
        self.first_changed = 0
        self.reader = ExistingReader(existing, spec.fmt is OutputFormat.CSV)

    def check_header(self, header: bytes) -> None:
        """The existing CSV must start with this run's header."""
        kept = io.BytesIO()
        self.reader.copy_lines(1, kept)
        if kept.getvalue() != header:
            raise OutputError(
                f"{self.existing.path} starts with {kept.getvalue()[:60]!r}, not the header {header!r} of this run's "
                "options; use the same options or --force",
                path=self.existing.path,
            )

    def take_block(self, block: pa.Table, fresh_sids: Callable[[pa.Table], np.ndarray]) -> pa.Table:
        """The rows of ``block`` after the kept ones (an empty table once the file is refused); the kept rows it
        holds are verified against their ``fresh_sids`` when asked, and every kept row is written before a new one."""
        first_pid = int(block.column("Pid")[0].as_py()) if block.num_rows else 0
        inside = min(block.num_rows, max(0, self.existing.rows - first_pid + 1))
        if inside and self.existing.verify:
            self._verify(block.slice(0, inside), fresh_sids)
        block = block.slice(inside)
        if not block.num_rows or self.changed:
            return block.slice(0, 0)
        self.keep_rest()
        return block

    def _verify(self, block: pa.Table, fresh_sids: Callable[[pa.Table], np.ndarray]) -> None:
        kept = self._keep(block.num_rows)
        if kept is None:  # refused already: the rest is only counted
            kept = self._sids(self.reader.take(block.num_rows))[1]
        differ = np.flatnonzero(fresh_sids(block) != kept)
        if len(differ):
            if not self.changed:
                self.first_changed = int(block.column("Pid")[int(differ[0])].as_py())
            self.changed += len(differ)

    def keep_rest(self) -> None:
        """Keep every existing row not kept yet (before the first new row, or at the end)."""
        while self.reader.remaining:
            self._keep(min(self.reader.remaining, KEEP_CHUNK_ROWS))

    def _keep(self, count: int) -> np.ndarray | None:
        """Write the next ``count`` existing rows as they are and seed every count from them; returns their packed
        SIDs (None once the file is refused: nothing is written any more)."""
        if self.changed:
            return None
        table = self.reader.take(count)
        codes, packed = self._sids(table)
        pids = table.column("Pid").to_numpy()
        broken = pid_break(pids, self.reader.taken - count + 1)
        if broken is not None:
            row, expected = broken
            raise OutputError(
                f"{self.existing.path}: Pid {int(pids[row])} where {expected} was expected; use --force to redo it",
                path=self.existing.path,
            )
        self.counter.add(packed)
        if self.spec.dedup:
            self.counter.seed_codes(packed, codes[:, self.levels])
        if self.on_codes is not None:
            self.on_codes(pids, codes)
        if isinstance(self.fmt, CsvFormat):
            self.reader.copy_lines(count, self.fmt.handle)
        else:
            names = ["Pid", "Codebook", "Vector", *(["SID"] if self.spec.sid_tokens else [])]
            self.fmt.write_table(table.select(names))
        return packed

    def _sids(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """The codes of existing rows as ``[n, levels (+1 with dedup)]`` (-1: no dedup code) and their packed SIDs."""
        codebook = table.column("Codebook").combine_chunks()
        lengths = pc.list_value_length(codebook).to_numpy()
        if self.spec.dedup:
            allowed = {self.levels + 1} if self.spec.fixed_length else {self.levels, self.levels + 1}
        else:
            allowed = {self.levels}
        bad = np.flatnonzero(~np.isin(lengths, list(allowed)))
        if len(bad):
            pid = table.column("Pid")[int(bad[0])].as_py()
            raise OutputError(
                f"{self.existing.path}: Pid {pid} has {lengths[bad[0]]} codes, not "
                f"{' or '.join(map(str, sorted(allowed)))} as this run's options give; use the same options or --force",
                path=self.existing.path,
            )
        width = self.levels + (1 if self.spec.dedup else 0)
        codes = np.full((len(lengths), width), -1, dtype=np.int64)
        flat = codebook.flatten().to_numpy().astype(np.int64)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        codes[rows, np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
        sizes = np.array(self.sizes)
        if len(codes) and ((codes[:, : self.levels] < 0) | (codes[:, : self.levels] >= sizes)).any():
            raise OutputError(
                f"{self.existing.path}: a code falls outside the codebook sizes {self.sizes} of the model; use --force "
                "to redo it",
                path=self.existing.path,
            )
        return codes, pack_codes(codes, self.sizes)

    def close(self) -> None:
        self.reader.close()
