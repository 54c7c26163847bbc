"""Where rows are ordered and files are published: the final writer.

:class:`DatasetWriter` writes every model's file of one dataset. Blocks arrive in Pid order; it checks that Pids run
1..N without gaps and that every code fits its codebook, counts SIDs as it goes (memory bounded by the codebook
sizes) and hashes the bytes it writes. Each file is written under a partial name beside its final name and renamed
into place only when complete and validated, so no partial output is ever visible. It then records the manifest and,
when asked, uploads the dataset's files to the Hub in one commit.

:class:`FinalWriter` is the Ray actor that runs one :class:`DatasetWriter` per dataset of a run, on the driver's node.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rqvae_ray.contract import EncodedColumns, ModelSlot, OutputFormat, OutputSpec
from rqvae_ray.errors import OutputError, UploadError
from rqvae_ray.formatting import (
    CSV_HEADER,
    CSV_HEADER_WITH_SID,
    csv_lines,
    string_bytes,
    with_dedup_codes,
    with_dedup_tokens,
)
from rqvae_ray.outputs import (
    MANIFEST_FILE,
    Manifest,
    ManifestEntry,
    Provenance,
    output_dir,
    partial_path,
    remove_stale_partials,
    utc_now,
)
from rqvae_ray.sid_stats import SidCounter


@dataclass(frozen=True)
class ModelTarget:
    """What the writer needs to know about one model's output."""

    model_id: str
    slot: int  # where this model's columns are in the blocks
    filename: str  # codebooks-<model>.<csv|parquet>
    codebook_sizes: tuple[int, ...]
    provenance: Provenance
    sinkhorn_levels: tuple[int, ...] = ()  # levels trained with Sinkhorn assignment (SIDs use the nearest codeword)


@dataclass(frozen=True)
class Published:
    """One published file: its manifest entry and where it is."""

    entry: ManifestEntry
    path: str


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes passing through it, so that no output is ever read back to hash it;
    closing it flushes and fsyncs."""

    def __init__(self, path: Path, digest: hashlib._Hash) -> None:
        super().__init__()
        self._file = path.open("wb")
        self._digest = digest
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._digest.update(data)
        written = self._file.write(data)
        self._position += written
        return written

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        super().close()


class _Sink:
    """One model's partial output file.

    With dedup the rows first go to a spool file (Arrow IPC, on disk) while every SID is counted; closing the sink
    then streams the spool once more, adding each shared SID's extra code in Pid order.
    """

    def __init__(self, target: ModelTarget, final: Path, spec: OutputSpec) -> None:
        self.target = target
        self.slot = ModelSlot(target.slot)
        self.final = final
        self.partial = partial_path(final)
        self.spec = spec
        self.digest = hashlib.sha256()
        self.counter = SidCounter(target.codebook_sizes)
        self.encode_seconds = 0.0
        self.closed = False
        self._parquet = None
        self._spool = None
        self._spool_path = partial_path(final, "spool")
        # Both formats write through one hashing file: CSV text directly, Parquet through pyarrow's writer.
        self._handle = _HashingFile(self.partial, self.digest)
        if spec.fmt is OutputFormat.CSV:
            self._handle.write(CSV_HEADER_WITH_SID if spec.sid_tokens else CSV_HEADER)

    def append(self, block: pa.Table) -> None:
        encoded = self.slot.read(block)
        sids = encoded.sid.to_numpy()
        if len(sids) and (sids.min() < 0 or sids.max() >= self.counter.space):
            raise OutputError(
                f"{self.target.model_id}: a code falls outside the codebook sizes; output rejected",
                path=str(self.final),
            )
        self.counter.add(sids)
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

    def _emit(self, pids: pa.ChunkedArray, encoded: EncodedColumns, extra: np.ndarray | None) -> None:
        levels = len(self.target.codebook_sizes)
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
        import pyarrow.parquet as pq

        columns = {
            "Pid": pids,
            "Codebook": encoded.codebook if extra is None else with_dedup_codes(encoded.codebook, extra),
            "Vector": encoded.vector,
        }
        if self.spec.sid_tokens:
            tokens = _whole(encoded.tokens)
            columns["SID"] = tokens if extra is None else with_dedup_tokens(tokens, extra, levels)
        out = pa.table(columns)
        if self._parquet is None:
            # Dictionary encoding is retried for every row group and costs ~8x the CPU of the plain encoding on
            # the float Vector column, for a larger file; only the SID strings repeat enough to gain from it.
            dictionary = ["SID"] if self.spec.sid_tokens else False
            self._parquet = pq.ParquetWriter(self._handle, out.schema, use_dictionary=dictionary)
        self._parquet.write_table(out)

    def _replay_spool(self) -> None:
        if self._spool is None:
            return
        self._spool.close()
        with pa.memory_map(str(self._spool_path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                encoded = EncodedColumns(**{name: batch.column(name) for name in batch.schema.names if name != "Pid"})
                self._emit(batch.column("Pid"), encoded, self.counter.dedup_codes(encoded.sid.to_numpy()))
        self._spool_path.unlink()

    def close(self) -> None:
        """Finish the partial file (flushed and fsynced)."""
        if self.closed:
            return
        self.closed = True
        self._replay_spool()
        if self._parquet is not None:
            self._parquet.close()
        self._handle.close()  # Parquet may have closed it already, which is harmless

    def discard(self) -> None:
        """Close and delete the partial files."""
        try:
            self.close()
        except (OSError, ValueError, pa.ArrowException):
            pass
        for path in (self.partial, self._spool_path):
            path.unlink(missing_ok=True)


def _unwritable(exc: OSError, folder: Path) -> OutputError:
    """One line for an output folder that cannot be written, saying read-only where it is."""
    where = exc.filename or folder
    read_only = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    why = f"{exc.strerror}: it is read-only for this process" if read_only else exc.strerror
    return OutputError(f"cannot write in {where} ({why}); choose a writable --out-dir", path=str(where))


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class DatasetWriter:
    """Writes every model's output of one dataset (in the :class:`FinalWriter` actor, or in-process).

    ``out_dir`` None means upload-only: files are written under a private temporary directory on this node, which is
    removed after a successful upload and kept (and named in the error) when the upload fails.
    """

    def __init__(
        self,
        repo: str,
        targets: list[ModelTarget],
        out_dir: str | None,
        base_folder: str,
        spec: OutputSpec,
        num_pois: int,
    ) -> None:
        self.repo = repo
        self.spec = spec
        self.num_pois = num_pois
        self.base_folder = base_folder
        self.temporary = out_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="rqvae_ray-out-")) if out_dir is None else Path(out_dir)
        self.folder = output_dir(self.root, repo, base_folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.folder)
            self.sinks = [_Sink(target, self.folder / target.filename, spec) for target in targets]
        except OSError as exc:
            raise _unwritable(exc, self.folder) from None
        self.next_pid = 1
        self.published: list[Path] = []

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
        return self.next_pid - 1

    def finish(self) -> list[Published]:
        """Validate every file, rename it into place and update the manifest; one result per model."""
        for sink in self.sinks:
            sink.close()
        if self.next_pid - 1 != self.num_pois:
            self.abort()
            raise OutputError(f"{self.repo}: wrote {self.next_pid - 1} rows but the dataset has {self.num_pois} POIs")
        manifest = Manifest.read(self.folder, self.repo)
        results = []
        for sink in self.sinks:
            try:
                os.replace(sink.partial, sink.final)
            except OSError as exc:
                raise OutputError(
                    f"cannot publish {sink.final}: {exc.strerror}; check the folder's permissions", path=str(sink.final)
                ) from None
            self.published.append(sink.final)
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
                **vars(sink.target.provenance),
            )
            manifest.entries[entry.file] = entry
            results.append(Published(entry, str(sink.final)))
        manifest.write()
        return results

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """Commit this run's files and the manifest to the dataset repo; returns the commit oid."""
        from rqvae_ray.upload import commit_files

        prefix = f"{self.base_folder}/Intermediate Files"
        files = [(path, f"{prefix}/{path.name}") for path in [*self.published, self.folder / MANIFEST_FILE]]
        try:
            oid = commit_files(self.repo, files, message, retries=retries, backoff_s=backoff_s)
        except UploadError as exc:
            raise UploadError(f"{exc}; the finished files are kept in {self.folder}", repo=self.repo) from None
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
        return oid

    def abort(self) -> None:
        """Drop every unpublished file."""
        for sink in self.sinks:
            sink.discard()
        if self.temporary and not self.published:
            shutil.rmtree(self.root, ignore_errors=True)


class FinalWriter:
    """The final Ray actor of a run: one :class:`DatasetWriter` per dataset, blocks applied in sequence order.

    It runs threaded (one thread per dataset, so that datasets write side by side); the driver numbers each
    dataset's blocks, and a block that arrives before its predecessor waits here until they are written.
    """

    def __init__(self) -> None:
        self._writers: dict[str, DatasetWriter] = {}
        self._early: dict[str, dict[int, tuple[pa.Table, tuple[int, int] | None]]] = {}
        self._next: dict[str, int] = {}
        self._locks: dict[str, threading.Lock] = {}

    def open(
        self,
        repo: str,
        targets: list[ModelTarget],
        out_dir: str | None,
        base_folder: str,
        spec: OutputSpec,
        num_pois: int,
    ) -> None:
        self._writers[repo] = DatasetWriter(repo, targets, out_dir, base_folder, spec, num_pois)
        self._early[repo], self._next[repo], self._locks[repo] = {}, 0, threading.Lock()

    def write(self, repo: str, seq: int, block: pa.Table, span: tuple[int, int] | None) -> int:
        """Write block number ``seq`` of ``repo`` (and the ones it held back); returns the rows written so far."""
        with self._locks[repo]:
            writer, early = self._writers[repo], self._early[repo]
            early[seq] = (block, span)
            while self._next[repo] in early:
                writer.write(*early.pop(self._next[repo]))
                self._next[repo] += 1
            return writer.next_pid - 1

    def finish(self, repo: str) -> list[Published]:
        with self._locks[repo]:
            if self._early[repo]:
                raise OutputError(f"{repo}: {len(self._early[repo])} block(s) never got their predecessors written")
            return self._writers[repo].finish()

    def upload(self, repo: str, message: str, retries: int, backoff_s: float) -> str:
        return self._writers[repo].upload(message, retries, backoff_s)

    def abort(self, repo: str) -> None:
        writer = self._writers.get(repo)
        if writer is not None:
            with self._locks[repo]:
                writer.abort()
