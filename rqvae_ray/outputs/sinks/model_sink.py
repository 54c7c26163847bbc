"""One model's partial output file and its exports: each block's rows are checked, counted, journaled, and written
(or spooled until every SID is counted, with ``--dedup`` or ``--max-per-sid``), after the rows kept from an existing
file."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rqvae_ray.core.contract import (
    CsvText,
    EncodedColumns,
    ModelSlot,
    OutputFormat,
    OutputSpec,
    csv_text,
    encoded_columns,
)
from rqvae_ray.core.encoder import codeword_sums
from rqvae_ray.core.sid_stats import SidCounter
from rqvae_ray.errors import OutputError, RqvaeRayError
from rqvae_ray.outputs.exports import ModelExports
from rqvae_ray.outputs.resume import remove_resume_state
from rqvae_ray.outputs.sinks.cap import CapSpool, Moves
from rqvae_ray.outputs.sinks.formats import CsvFormat, ParquetFormat
from rqvae_ray.outputs.sinks.journal import Journal
from rqvae_ray.outputs.sinks.kept import KeptRows
from rqvae_ray.outputs.sinks.spool import RowSpool
from rqvae_ray.outputs.staging import HashingFile, partial_path
from rqvae_ray.outputs.targets import ModelTarget


class ModelSink:
    """The partial file of ``target`` beside its final path ``final``, until it is published or discarded."""

    def __init__(self, target: ModelTarget, final: Path, spec: OutputSpec, num_pois: int) -> None:
        self.target = target
        self.slot = ModelSlot(target.slot)
        self.final = final
        self.partial = partial_path(final)
        self.spec = spec
        self.counter = SidCounter(target.codebook_sizes)
        self.layout = self.counter.layout
        self.encode_seconds = 0.0
        self.closed = False
        self.journal: Journal | None = None
        self.exports: ModelExports | None = None
        self.kept: KeptRows | None = None
        capped = spec.max_per_sid is not None
        self.spool = RowSpool(partial_path(final, "spool")) if spec.dedup or capped else None
        self.cap: CapSpool | None = None
        self.moves: Moves | None = None
        # Both formats write through one hashing file: CSV text directly, Parquet through pyarrow's writer.
        self._handle = HashingFile(self.partial)
        levels = len(target.codebook_sizes)
        if spec.fmt is OutputFormat.CSV:
            self.format: CsvFormat | ParquetFormat = CsvFormat(self._handle, spec, levels)
        else:
            self.format = ParquetFormat(self._handle, spec, levels, target.codebooks)
        try:
            if capped:
                self.cap = CapSpool(partial_path(final, "cap"), self.layout, target.codebooks, spec.max_per_sid)
            if target.resume_key:
                self.journal = Journal(final, target.resume_key, target.resume_rows, self.layout)
            exported = spec.exported or spec.preset_files
            sizes, books = target.codebook_sizes, target.codebooks
            self.exports = ModelExports(final, spec, sizes, num_pois, books) if exported else None
            row_exports = self.exports if self.exports is not None and self.exports.takes_rows else None
            if target.existing is not None:
                on_codes = row_exports.add if row_exports is not None else None
                self.kept = KeptRows(target.existing, spec, target.codebook_sizes, self.counter, self.format, on_codes)
                if isinstance(self.format, CsvFormat):
                    self.kept.check_header(self.format.header)
            self._row_exports = row_exports
            self.format.start()
        except BaseException:
            self.discard()
            raise

    @property
    def digest(self):
        return self._handle.digest

    def quality(self) -> dict:
        """The SID quality figures of the file (with the cap's, see :meth:`Moves.figures`)."""
        summary = self.counter.summary()
        if self.moves is not None:
            summary["cap"] = self.moves.figures(self.spec.max_per_sid)
        return summary

    @property
    def changed(self) -> int:
        """Kept POIs whose freshly encoded SID differs from the file's."""
        return self.kept.changed if self.kept is not None else 0

    @functools.cached_property
    def _text(self) -> CsvText | None:
        """The CSV text maker of rows rebuilt from their codes (the encode stage's)."""
        if self.spec.fmt is not OutputFormat.CSV:
            return None
        vectors_of = functools.partial(codeword_sums, self.target.codebooks)
        return csv_text(vectors_of, self.spec.sid_tokens, self.target.codebook_sizes, lines=not self.spec.text_parts)

    def _rebuilt(self, pids: np.ndarray, packed: np.ndarray) -> EncodedColumns:
        """The columns of rows of known SIDs, as the encode stage makes them (same formatting code, same bytes)."""
        return encoded_columns(pids, self.layout.unpack(packed), packed, self.spec, self._text)

    def replay(self) -> None:
        """Write rows 1..resume_rows again from the journal of the interrupted run: the same codes, formatted by the
        same code as in the encode stage, give the same bytes."""
        for pids, _codes, packed in self.journal.replay():
            encoded = self._rebuilt(pids, packed)
            encoded = dataclasses.replace(encoded, seconds=pa.array(np.zeros(len(pids))))  # counted in the state
            self.append(self.slot.attach(pa.table({"Pid": pa.array(pids)}), encoded), journal=False)
        self.encode_seconds += self.target.resume_seconds

    def checkpoint(self) -> None:
        if self.journal is not None:
            self.journal.checkpoint(self.encode_seconds)

    def append(self, block: pa.Table, journal: bool = True) -> None:
        """Append one block's rows of this model (rows of an existing file it keeps are taken from that file)."""
        if self.kept is not None:
            block = self.kept.take_block(block, lambda rows: self._sids(self.slot.read(rows)))
            if not block.num_rows:
                return
        encoded = self.slot.read(block)
        sids = self._sids(encoded)
        self._check_codes(sids)
        self.counter.add(sids)
        if journal and self.journal is not None:
            self.journal.append(sids)
        if self.cap is not None:
            self.cap.add(sids, encoded.latent)
        if encoded.seconds is not None:
            self.encode_seconds += float(pc.sum(encoded.seconds).as_py() or 0.0)
        if self.spool is not None:
            self.spool.add(block.column("Pid"), encoded)
        else:
            self._emit(block.column("Pid"), encoded, sids, None)

    def _sids(self, encoded: EncodedColumns) -> np.ndarray:
        """The packed SIDs of some rows (see :class:`~rqvae_ray.core.sid_stats.SidLayout`)."""
        try:
            return self.layout.from_arrow(encoded.sid)
        except ValueError as exc:
            raise OutputError(f"{self.target.model_id}: {exc}; output rejected", path=str(self.final)) from None

    def _check_codes(self, sids: np.ndarray) -> None:
        if not self.layout.in_range(sids):
            raise OutputError(
                f"{self.target.model_id}: a code falls outside the codebook sizes; output rejected",
                path=str(self.final),
            )

    def _emit(self, pids: pa.ChunkedArray, encoded: EncodedColumns, sids: np.ndarray, extra: np.ndarray | None) -> None:
        """Write rows (``sids``: their packed SIDs, as ``_sids`` reads them from ``encoded``)."""
        needed = self.format.needs_codes or self._row_exports is not None
        codes = self.layout.unpack(sids) if needed else None
        if self._row_exports is not None:
            self._row_exports.add(pids.to_numpy(), codes if extra is None else np.column_stack([codes, extra]))
        self.format.write(pids, encoded, codes, extra)

    def close(self) -> None:
        """Finish the partial file (flushed and fsynced) and its exports; a refused file is left as it is."""
        if self.closed:
            return
        self.closed = True
        if self.journal is not None:
            self.journal.close()
        if self.changed:
            return
        if self.kept is not None:
            self.kept.keep_rest()
            self.kept.close()
        if self.cap is not None:
            self.moves = self.cap.moves(self.counter)
        if self.spool is not None:
            first_row = 0
            for pids, spooled in self.spool.replay():
                encoded = spooled if self.moves is None else self.moves.apply(first_row, pids, spooled, self._rebuilt)
                first_row += len(pids)
                sids = self._sids(encoded)
                extra = None
                if self.spec.dedup:  # after the cap: the codes of the SIDs the POIs now hold
                    extra = self.counter.dedup_codes(sids, self.spec.fixed_length)
                self._emit(pids, encoded, sids, extra)
        self.format.close()
        self._handle.close()  # Parquet may have closed it already, which is harmless
        if self.exports is not None:
            self.exports.close(self.counter)

    def discard(self, keep_resume: bool = False) -> None:
        """Delete the partial files, then close them; the resume state too, unless ``keep_resume`` (an interrupted
        run, which the next run with the same inputs continues), when it is kept if it can be written. Never raises
        an OSError: a partial file that cannot be deleted is removed by a later run."""
        self.closed = True  # nothing more is written: a dropped file is not finished
        exported = self.exports.files if self.exports is not None else []
        spooled = [spool.path for spool in (self.spool, self.cap) if spool is not None]
        # Deleted before anything else is written: on a full disk they hold the space that the rest needs.
        for path in [self.partial, *spooled, *(path for export in exported for path in export.leftovers())]:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        closing = (self.format, self.kept, self._handle, *(export.handle for export in exported))
        for handle in (c for c in closing if c is not None):
            with contextlib.suppress(OSError, ValueError, pa.ArrowException, RqvaeRayError):
                handle.close()
        with contextlib.suppress(OSError):
            if self.spool is not None:
                self.spool.discard()
            if self.cap is not None:
                self.cap.discard()
            if self.exports is not None:
                self.exports.discard()
        if keep_resume:
            with contextlib.suppress(OSError):  # the resume state is worth keeping, not worth failing over
                self.checkpoint()
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.close()
        if not keep_resume:
            with contextlib.suppress(OSError):
                remove_resume_state(self.final)
