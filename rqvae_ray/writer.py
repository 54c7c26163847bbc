"""Where rows are ordered and files are published: the final writer.

:class:`DatasetWriter` writes every model's file of one dataset. Blocks arrive in Pid order; it checks that Pids run
without gaps up to N and that every code fits its codebook, counts SIDs as it goes (memory bounded by the codebook
sizes) and hashes the bytes it writes. A model's file may start with the rows of an existing file
(:class:`~rqvae_ray.existing_rows.ExistingRows`), streamed in step with the blocks. Each file, and each file
exported beside it (:mod:`rqvae_ray.exports`), is written under a partial name beside its final name and renamed
into place only when complete and validated, so no partial output is ever visible. It then records the manifest
and, when asked, uploads the dataset's files to the Hub in one commit.

:class:`FinalWriter` is the Ray actor that runs one :class:`DatasetWriter` per dataset of a run, on the driver's node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import io
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rqvae_ray.contract import EncodedColumns, ModelSlot, OutputFormat, OutputSpec
from rqvae_ray.encoder import codeword_sums
from rqvae_ray.errors import OutputError, RqvaeRayError, UploadError
from rqvae_ray.existing_rows import ExistingReader, ExistingRows
from rqvae_ray.exports import ModelExports
from rqvae_ray.formatting import (
    CSV_HEADER,
    CSV_HEADER_WITH_SID,
    SidText,
    arrow_columns,
    csv_lines,
    string_bytes,
    with_dedup_codes,
    with_dedup_tokens,
)
from rqvae_ray.outputs import (
    JOURNAL_ROW_BYTES,
    MANIFEST_FILE,
    ExportRecord,
    ExtendedFile,
    HashingFile,
    Manifest,
    ManifestEntry,
    Provenance,
    ResumeState,
    folder_lock,
    journal_path,
    output_dir,
    owner_tag,
    partial_path,
    remove_resume_state,
    remove_stale_partials,
    repo_folder,
    utc_now,
)
from rqvae_ray.sid_stats import SidCounter, pack_codes, unpack_codes

JOURNAL_DTYPE = np.dtype(f"<i{JOURNAL_ROW_BYTES}")
REPLAY_ROWS = 1 << 16  # rows rebuilt from a journal at a time
# How often the writer makes its journals safe on disk: an interrupted run is resumed from the last checkpoint.
CHECKPOINT_S = 2.0
PARQUET_ROW_GROUP_ROWS = 1 << 16
# How long the final writer's calls for a dataset wait for its files to be opened.
OPEN_WAIT_S = 600.0


@dataclass(frozen=True)
class ModelTarget:
    """What the writer needs to know about one model's output."""

    model_id: str
    slot: int  # where this model's columns are in the blocks
    filename: str  # codebooks-<model>.<csv|parquet>
    codebook_sizes: tuple[int, ...]
    provenance: Provenance
    sinkhorn_levels: tuple[int, ...] = ()  # levels trained with Sinkhorn assignment (SIDs use the nearest codeword)
    features_rows_sha256: str = ""  # rows_digests of the features of Pids 1..N
    existing: ExistingRows | None = None  # the rows the file starts with
    codebooks: tuple[np.ndarray, ...] = ()  # the model's codebooks (float32), to rebuild rows from their codes
    resume_key: str = ""  # the key of its resume state (empty: no resume state is kept)
    resume_rows: int = 0  # rows 1..resume_rows come from the journal of an interrupted run
    resume_seconds: float = 0.0  # the encode seconds of those rows


@dataclass(frozen=True)
class Published:
    """One published codebooks file: its manifest entry and where it is."""

    entry: ManifestEntry
    path: str

    @property
    def model_id(self) -> str:
        return self.entry.model_id


@dataclass(frozen=True)
class Refused:
    """A model whose file was not published: ``reason`` is the one-line why."""

    model_id: str
    reason: str


class _Sink:
    """One model's partial output file (and its exports).

    With dedup the new rows first go to a spool file (Arrow IPC, on disk) while every SID is counted; closing the
    sink then streams the spool once more, adding the dedup codes in Pid order. Kept rows of an existing file are
    written as they arrive from it, before any new row.
    """

    def __init__(self, target: ModelTarget, final: Path, spec: OutputSpec, num_pois: int) -> None:
        self.target = target
        self.slot = ModelSlot(target.slot)
        self.final = final
        self.partial = partial_path(final)
        self.spec = spec
        self.levels = len(target.codebook_sizes)
        self.counter = SidCounter(target.codebook_sizes)
        self.encode_seconds = 0.0
        self.closed = False
        self.changed = 0  # kept POIs whose freshly encoded SID differs from the file's
        self.first_changed = 0
        self._parquet = None
        self._row_groups: list[pa.Table] = []  # Parquet rows not yet written as a row group
        self._held_rows = 0
        self._spool = None
        self._spool_path = partial_path(final, "spool")
        self._existing = None
        self.exports = None
        self._exports_rows = False
        self._journal = None
        self.journaled = 0
        # Both formats write through one hashing file: CSV text directly, Parquet through pyarrow's writer.
        self._handle = HashingFile(self.partial)
        try:
            if target.resume_key:
                self._open_journal()
            self.exports = ModelExports(final, spec, target.codebook_sizes, num_pois) if spec.exported else None
            self._exports_rows = self.exports is not None and self.exports.takes_rows
            if target.existing is not None:
                self._existing = ExistingReader(target.existing, spec.fmt is OutputFormat.CSV)
            if spec.fmt is OutputFormat.CSV:
                self._start_csv()
        except BaseException:
            self.discard()
            raise

    @property
    def digest(self):
        return self._handle.digest

    def _open_journal(self) -> None:
        """The journal of this file's SIDs (resume state): continued from its first ``resume_rows``, else new."""
        path = journal_path(self.final)
        if self.target.resume_rows:
            self._journal = path.open("r+b")
            self._journal.truncate(self.target.resume_rows * JOURNAL_ROW_BYTES)
            self._journal.seek(0, os.SEEK_END)
        else:
            remove_resume_state(self.final)
            self._journal = path.open("wb")
        self.journaled = self.target.resume_rows

    def replay(self) -> None:
        """Write rows 1..resume_rows again from the journal of the interrupted run: the same codes, formatted by the
        same code as in the encoder actors, give the same bytes."""
        from rqvae_ray.encode_stage import encoded_columns

        sizes, rows = self.target.codebook_sizes, self.target.resume_rows
        vectors_of = functools.partial(codeword_sums, self.target.codebooks)
        text = SidText(vectors_of, self.spec.sid_tokens) if self.spec.fmt is OutputFormat.CSV else None
        journal = np.memmap(journal_path(self.final), dtype=JOURNAL_DTYPE, mode="r", shape=(rows,))
        for start in range(0, rows, REPLAY_ROWS):
            packed = np.array(journal[start : start + REPLAY_ROWS], dtype=np.int64)
            codes = unpack_codes(packed, sizes).astype(np.int32)
            pids = np.arange(start + 1, start + 1 + len(packed), dtype=np.int64)
            encoded = encoded_columns(pids, codes, packed, self.spec, text)
            encoded = dataclasses.replace(encoded, seconds=pa.array(np.zeros(len(pids))))  # counted in the state
            self.append(self.slot.attach(pa.table({"Pid": pa.array(pids)}), encoded), journal=False)
        del journal
        self.encode_seconds += self.target.resume_seconds

    def checkpoint(self) -> None:
        """Make the SIDs written so far safe on disk and record how many (the resume state of this file)."""
        if self._journal is None or self._journal.closed:
            return
        self._journal.flush()
        os.fsync(self._journal.fileno())
        inode = os.fstat(self._journal.fileno()).st_ino
        ResumeState(self.target.resume_key, self.journaled, self.encode_seconds, owner_tag(), inode).write(self.final)

    def _start_csv(self) -> None:
        header = CSV_HEADER_WITH_SID if self.spec.sid_tokens else CSV_HEADER
        if self._existing is not None:
            kept = io.BytesIO()
            self._existing.copy_lines(1, kept)
            if kept.getvalue() != header:
                raise OutputError(
                    f"{self._existing.existing.path} starts with {kept.getvalue()[:60]!r}, not the header "
                    f"{header!r} of this run's options; use the same options or --force",
                    path=self._existing.existing.path,
                )
        self._handle.write(header)

    def append(self, block: pa.Table, journal: bool = True) -> None:
        if self._existing is not None:
            first_pid = int(block.column("Pid")[0].as_py()) if block.num_rows else 0
            inside = min(block.num_rows, max(0, self._existing.existing.rows - first_pid + 1))
            if inside and self._existing.existing.verify:
                self._verify(block.slice(0, inside))
            block = block.slice(inside)
            if not block.num_rows or self.changed:
                return
            self._keep_rest()
        encoded = self.slot.read(block)
        sids = encoded.sid.to_numpy()
        self._check_codes(sids)
        self.counter.add(sids)
        if journal and self._journal is not None:
            self._journal.write(sids.astype(JOURNAL_DTYPE).tobytes())
            self.journaled += len(sids)
        if encoded.seconds is not None:
            self.encode_seconds += float(pc.sum(encoded.seconds).as_py() or 0.0)
        if not self.spec.dedup:
            self._emit(block.column("Pid"), encoded, None)
            return
        parts = {name: value for name, value in vars(encoded).items() if value is not None}
        table = pa.table({"Pid": block.column("Pid"), **parts})
        if self._spool is None:
            self._spool = pa.ipc.new_file(self._spool_path, table.schema)
        self._spool.write_table(table)

    def _check_codes(self, sids: np.ndarray) -> None:
        if len(sids) and (sids.min() < 0 or sids.max() >= self.counter.space):
            raise OutputError(
                f"{self.target.model_id}: a code falls outside the codebook sizes; output rejected",
                path=str(self.final),
            )

    def _verify(self, block: pa.Table) -> None:
        """Keep the next rows of the existing file, checking that the block's fresh SIDs of them are the same."""
        kept = self._keep(block.num_rows)
        if kept is None:  # refused already: the rest is only counted
            kept = self._kept_sids(self._existing.take(block.num_rows))[1]
        differ = np.flatnonzero(self.slot.read(block).sid.to_numpy() != kept)
        if len(differ):
            if not self.changed:
                self.first_changed = int(block.column("Pid")[int(differ[0])].as_py())
            self.changed += len(differ)

    def _keep_rest(self) -> None:
        """Keep every existing row not kept yet (before the first new row, or at the end)."""
        while self._existing.remaining:
            self._keep(min(self._existing.remaining, 1 << 16))

    def _keep(self, count: int) -> np.ndarray | None:
        """Write the next ``count`` rows of the existing file as they are and seed every count from them; returns
        their packed SIDs (None once the file is refused: nothing is written any more)."""
        if self.changed:
            return None
        table = self._existing.take(count)
        codes, packed = self._kept_sids(table)
        expected = np.arange(self._existing.taken - count + 1, self._existing.taken + 1)
        pids = table.column("Pid").to_numpy()
        if not np.array_equal(pids, expected):
            row = int(np.flatnonzero(pids != expected)[0])
            raise OutputError(
                f"{self._existing.existing.path}: Pid {int(pids[row])} where {int(expected[row])} was expected; "
                "use --force to redo it",
                path=self._existing.existing.path,
            )
        self.counter.add(packed)
        if self.spec.dedup:
            self.counter.seed_codes(packed, codes[:, self.levels])
        if self._exports_rows:
            self.exports.add(pids, codes)
        if self.spec.fmt is OutputFormat.CSV:
            self._existing.copy_lines(count, self._handle)
        else:
            names = ["Pid", "Codebook", "Vector", *(["SID"] if self.spec.sid_tokens else [])]
            self._write_parquet(table.select(names))
        return packed

    def _kept_sids(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
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
                f"{self._existing.existing.path}: Pid {pid} has {lengths[bad[0]]} codes, not "
                f"{' or '.join(map(str, sorted(allowed)))} as this run's options give; use the same options or --force",
                path=self._existing.existing.path,
            )
        width = self.levels + (1 if self.spec.dedup else 0)
        codes = np.full((len(lengths), width), -1, dtype=np.int64)
        flat = codebook.flatten().to_numpy().astype(np.int64)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        codes[rows, np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
        sizes = np.array(self.target.codebook_sizes)
        if len(codes) and ((codes[:, : self.levels] < 0) | (codes[:, : self.levels] >= sizes)).any():
            raise OutputError(
                f"{self._existing.existing.path}: a code falls outside the codebook sizes {self.target.codebook_sizes} "
                "of the model; use --force to redo it",
                path=self._existing.existing.path,
            )
        packed = pack_codes(codes, self.target.codebook_sizes)
        return codes, packed

    def _emit(self, pids: pa.ChunkedArray, encoded: EncodedColumns, extra: np.ndarray | None) -> None:
        levels = self.levels
        parquet = self.spec.fmt is OutputFormat.PARQUET
        needed = parquet or self._exports_rows
        codes = unpack_codes(encoded.sid.to_numpy(), self.target.codebook_sizes) if needed else None
        if self._exports_rows:
            self.exports.add(pids.to_numpy(), codes if extra is None else np.column_stack([codes, extra]))
        if self.spec.fmt is OutputFormat.CSV:
            if encoded.lines is not None:
                self._handle.write(string_bytes(encoded.lines))
                return
            parts = {
                k: _whole(v)
                for k, v in (("head", encoded.head), ("tail", encoded.tail), ("tokens", encoded.tokens))
                if v is not None
            }
            self._handle.write(string_bytes(csv_lines(parts, extra, levels)))
            return
        built = arrow_columns(pids.to_numpy(), codes, codeword_sums(self.target.codebooks, codes))
        columns = {
            "Pid": pids,
            "Codebook": built["Codebook"] if extra is None else with_dedup_codes(built["Codebook"], extra),
            "Vector": built["Vector"],
        }
        if self.spec.sid_tokens:
            tokens = _whole(encoded.tokens)
            columns["SID"] = tokens if extra is None else with_dedup_tokens(tokens, extra, levels)
        self._write_parquet(pa.table(columns))

    def _write_parquet(self, table: pa.Table) -> None:
        import pyarrow.parquet as pq

        if self._parquet is None:
            # Dictionary encoding is retried for every row group and costs ~8x the CPU of the plain encoding on
            # the float Vector column, for a larger file; only the SID strings repeat enough to gain from it.
            dictionary = ["SID"] if self.spec.sid_tokens else False
            self._parquet = pq.ParquetWriter(self._handle, table.schema, use_dictionary=dictionary)
        elif table.schema != self._parquet.schema:
            table = table.cast(self._parquet.schema)
        # Row groups of a fixed size, whatever the blocks: the file's bytes depend on its rows alone (the plan, the
        # blocks Ray Data makes, or resuming an interrupted run change nothing).
        self._row_groups.append(table)
        self._held_rows += table.num_rows
        while self._held_rows >= PARQUET_ROW_GROUP_ROWS:
            self._flush_row_group(PARQUET_ROW_GROUP_ROWS)

    def _flush_row_group(self, rows: int) -> None:
        held = pa.concat_tables(self._row_groups)
        # One chunk per column: pages are cut where the chunks are fed in, so the chunks must not depend on the blocks.
        self._parquet.write_table(held.slice(0, rows).combine_chunks(), row_group_size=rows)
        self._row_groups, self._held_rows = [held.slice(rows)], self._held_rows - rows

    def _replay_spool(self) -> None:
        if self._spool is None:
            return
        self._spool.close()
        with pa.memory_map(str(self._spool_path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                encoded = EncodedColumns(**{name: batch.column(name) for name in batch.schema.names if name != "Pid"})
                extra = self.counter.dedup_codes(encoded.sid.to_numpy(), self.spec.fixed_length)
                self._emit(batch.column("Pid"), encoded, extra)
        self._spool_path.unlink()

    def close(self) -> None:
        """Finish the partial file (flushed and fsynced) and its exports; a refused file is left as it is."""
        if self.closed:
            return
        self.closed = True
        if self._journal is not None:
            self._journal.close()
        if self.changed:
            return
        if self._existing is not None:
            self._keep_rest()
            self._existing.close()
        self._replay_spool()
        if self._parquet is not None:
            if self._held_rows:
                self._flush_row_group(self._held_rows)
            self._parquet.close()
        self._handle.close()  # Parquet may have closed it already, which is harmless
        if self.exports is not None:
            self.exports.close(self.counter)

    def discard(self, keep_resume: bool = False) -> None:
        """Close and delete the partial files; the resume state too, unless ``keep_resume`` (an interrupted run,
        which the next run with the same inputs continues)."""
        if keep_resume:
            self.checkpoint()
        if self._journal is not None:
            self._journal.close()
        if not keep_resume:
            remove_resume_state(self.final)
        self.closed = True  # nothing more is written: a dropped file is not finished
        for closing in (self._spool, self._parquet, self._existing, self._handle):
            if closing is not None:
                with contextlib.suppress(OSError, ValueError, pa.ArrowException, RqvaeRayError):
                    closing.close()
        if self.exports is not None:
            self.exports.discard()
        for path in (self.partial, self._spool_path):
            path.unlink(missing_ok=True)


def _unwritable(exc: OSError, folder: Path) -> OutputError:
    """One line for an output folder that cannot be written, saying read-only where it is."""
    where = exc.filename or folder
    read_only = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    why = f"{exc.strerror}: it is read-only for this process" if read_only else exc.strerror
    return OutputError(f"cannot write in {where} ({why}); choose a writable --out-dir", path=str(where))


def _changed_reason(sink: _Sink) -> str:
    return (
        f"{sink.changed} POI(s) already in {sink.target.filename} now get another SID (first Pid {sink.first_changed}):"
        " their features changed since it was written; --force redoes the file from scratch"
    )


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class DatasetWriter:
    """Writes every model's output of one dataset (in the :class:`FinalWriter` actor, or in-process).

    ``out_dir`` None means upload-only: files are written under a private temporary directory on this node, which is
    removed after a successful upload and kept (and named in the error) when the upload fails. Blocks start at Pid
    ``first_pid``: a model whose file starts with existing rows needs none of them, and ignores those it is given
    unless it verifies them.
    """

    def __init__(
        self,
        repo: str,
        targets: list[ModelTarget],
        out_dir: str | None,
        base_folder: str,
        spec: OutputSpec,
        num_pois: int,
        first_pid: int = 1,
    ) -> None:
        self.repo = repo
        self.spec = spec
        self.num_pois = num_pois
        self.base_folder = base_folder
        self.temporary = out_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="rqvae_ray-out-")) if out_dir is None else Path(out_dir)
        self.folder = output_dir(self.root, repo, base_folder)
        self.sinks: list[_Sink] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.folder)
            for target in targets:
                self.sinks.append(_Sink(target, self.folder / target.filename, spec, num_pois))
            for sink in self.sinks:
                if sink.target.resume_rows:
                    sink.replay()
        except OSError as exc:
            self.abort()
            raise _unwritable(exc, self.folder) from None
        except BaseException:
            self.abort()
            raise
        self.next_pid = first_pid
        self.published: list[Path] = []
        self.published_entries: dict[str, ManifestEntry] = {}
        self._checkpointed = time.monotonic()

    def write(self, block: pa.Table, span: tuple[int, int] | None = None) -> int:
        """Append one block, or its rows ``span``, in Pid order; returns the number of rows written so far."""
        if span is not None:
            block = block.slice(span[0], span[1] - span[0])
        if block.num_rows == 0:
            return self.next_pid - 1
        pids = block.column("Pid").to_numpy()
        expected = np.arange(self.next_pid, self.next_pid + len(pids), dtype=np.int64)
        if not np.array_equal(pids, expected):
            row = int(np.flatnonzero(pids != expected)[0])
            raise OutputError(
                f"{self.repo}: rows arrived out of Pid order (Pid {int(pids[row])} where {int(expected[row])} was "
                "expected); the input's Pids must run 1..N in order"
            )
        for sink in self.sinks:
            sink.append(block)
        self.next_pid += len(pids)
        if time.monotonic() - self._checkpointed >= CHECKPOINT_S:
            self.checkpoint()
        return self.next_pid - 1

    def checkpoint(self) -> None:
        """Make every file's SIDs so far safe on disk, so that an interrupted run resumes from here."""
        for sink in self.sinks:
            sink.checkpoint()
        self._checkpointed = time.monotonic()

    def finish(self) -> list[Published | Refused]:
        """Validate every file, rename it and its exports into place and update the manifest; one result per model
        (a :class:`Refused` one for a model whose kept POIs now get other SIDs)."""
        try:
            for sink in self.sinks:
                sink.close()
        except BaseException:
            self.abort()
            raise
        if self.next_pid - 1 != self.num_pois:
            self.abort()
            raise OutputError(f"{self.repo}: wrote {self.next_pid - 1} rows but the dataset has {self.num_pois} POIs")
        with folder_lock(self.folder):  # another run into this folder may be publishing now
            manifest = Manifest.read(self.folder, self.repo)
            results = [self._publish(sink, manifest) for sink in self.sinks]
            manifest.write()
        return results

    def _publish(self, sink: _Sink, manifest: Manifest) -> Published | Refused:
        """Rename one model's file and its exports into place and enter it in ``manifest`` (a model whose kept POIs
        now get other SIDs is refused and its files dropped)."""
        if sink.changed:
            sink.discard()
            return Refused(sink.target.model_id, _changed_reason(sink))
        exported = sink.exports.files if sink.exports is not None else []
        for partial, final in [(sink.partial, sink.final), *((e.partial, e.final) for e in exported)]:
            try:
                os.replace(partial, final)
            except OSError as exc:
                raise OutputError(
                    f"cannot publish {final}: {exc.strerror}; check the folder's permissions", path=str(final)
                ) from None
            self.published.append(final)
        existing = sink.target.existing
        entry = ManifestEntry(
            file=sink.target.filename,
            model_id=sink.target.model_id,
            format=self.spec.fmt.value,
            dedup=self.spec.dedup,
            sid_tokens=self.spec.sid_tokens,
            rows=sink.counter.rows,
            sha256=sink.digest.hexdigest(),
            written_at=utc_now(),
            sid_stats=sink.counter.summary(),
            encode_seconds=round(sink.encode_seconds, 3),
            sinkhorn_levels=list(sink.target.sinkhorn_levels),
            fixed_length=self.spec.fixed_length,
            exports=[ExportRecord(e.export.value, e.final.name, e.sha256) for e in exported],
            features_rows_sha256=sink.target.features_rows_sha256,
            extends=None if existing is None else ExtendedFile(existing.sha256, existing.rows),
            **vars(sink.target.provenance),
        )
        manifest.entries[entry.file] = entry
        self.published_entries[entry.file] = entry
        remove_resume_state(sink.final)
        return Published(entry, str(sink.final))

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """Commit this run's files to the dataset repo, with the repo's manifest updated by their entries (the
        repo's entries of other files stay, whatever this folder's manifest holds); returns the commit oid."""
        from rqvae_ray.upload import ManifestUpdate, commit_files

        prefix = repo_folder(self.base_folder)
        files = [(path, f"{prefix}/{path.name}") for path in self.published]
        manifest = ManifestUpdate(f"{prefix}/{MANIFEST_FILE}", self._repo_manifest)
        try:
            oid = commit_files(self.repo, files, message, retries=retries, backoff_s=backoff_s, manifest=manifest)
        except UploadError as exc:
            raise UploadError(f"{exc}; the finished files are kept in {self.folder}", repo=self.repo) from None
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
        return oid

    def _repo_manifest(self, current: bytes | None) -> bytes:
        """The repo's manifest after this run's commit: ``current`` (the repo's, None when it has none) with the
        entries of this run's files."""
        manifest = Manifest.parse(self.folder, self.repo, current)
        manifest.entries.update(self.published_entries)
        return manifest.to_bytes()

    def abort(self, keep_resume: bool = False) -> None:
        """Drop every unpublished file; with ``keep_resume`` (an interrupted run) keep what the next run resumes."""
        for sink in self.sinks:
            sink.discard(keep_resume)
        if self.temporary and not self.published:
            shutil.rmtree(self.root, ignore_errors=True)


class _Opening:
    """One dataset in the :class:`FinalWriter`: its writer once opened (or why it could not be), and the blocks that
    arrived before their predecessors."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.writer: DatasetWriter | None = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.early: dict[int, tuple[pa.Table, tuple[int, int] | None]] = {}
        self.next = 0


class FinalWriter:
    """The final Ray actor of a run: one :class:`DatasetWriter` per dataset, blocks applied in sequence order.

    It runs threaded (one thread per dataset, so that datasets write side by side), so calls may run in any order:
    the driver numbers each dataset's blocks, a block that arrives before its predecessor waits here until they are
    written, and every call waits for the dataset's ``open`` (which the driver does not wait for).
    """

    def __init__(self) -> None:
        self._datasets: dict[str, _Opening] = {}
        self._lock = threading.Lock()

    def _dataset(self, repo: str) -> _Opening:
        with self._lock:
            return self._datasets.setdefault(repo, _Opening())

    def _opened(self, repo: str) -> tuple[_Opening, DatasetWriter]:
        dataset = self._dataset(repo)
        if not dataset.opened.wait(OPEN_WAIT_S):
            raise OutputError(f"{repo}: the output files were never opened")
        if dataset.error is not None:
            raise dataset.error
        return dataset, dataset.writer

    def open(
        self,
        repo: str,
        targets: list[ModelTarget],
        out_dir: str | None,
        base_folder: str,
        spec: OutputSpec,
        num_pois: int,
        first_pid: int = 1,
    ) -> None:
        dataset = self._dataset(repo)
        try:
            dataset.writer = DatasetWriter(repo, targets, out_dir, base_folder, spec, num_pois, first_pid)
        except BaseException as exc:
            dataset.error = exc
            raise
        finally:
            dataset.opened.set()

    def write(self, repo: str, seq: int, block: pa.Table, span: tuple[int, int] | None) -> int:
        """Write block number ``seq`` of ``repo`` (and the ones it held back); returns the rows written so far."""
        dataset, writer = self._opened(repo)
        with dataset.lock:
            dataset.early[seq] = (block, span)
            while dataset.next in dataset.early:
                writer.write(*dataset.early.pop(dataset.next))
                dataset.next += 1
            return writer.next_pid - 1

    def finish(self, repo: str) -> list[Published | Refused]:
        dataset, writer = self._opened(repo)
        with dataset.lock:
            if dataset.early:
                raise OutputError(f"{repo}: {len(dataset.early)} block(s) never got their predecessors written")
            return writer.finish()

    def upload(self, repo: str, message: str, retries: int, backoff_s: float) -> str:
        return self._opened(repo)[1].upload(message, retries, backoff_s)

    def abort(self, repo: str, keep_resume: bool = False) -> None:
        dataset = self._dataset(repo)
        if dataset.opened.wait(OPEN_WAIT_S) and dataset.writer is not None:
            with dataset.lock:
                dataset.writer.abort(keep_resume)
