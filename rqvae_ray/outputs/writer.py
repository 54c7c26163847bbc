"""Where rows are ordered and files are published: the dataset writer.

:class:`DatasetWriter` writes every model's file of one dataset. Blocks arrive in Pid order; it checks that Pids run
without gaps up to N, hands each block to every model's sink (:mod:`rqvae_ray.outputs.sinks`), which checks, counts,
journals and writes its rows, and makes the journals safe every few seconds. Each file, and each file exported
beside it, is written under a partial name beside its final name and renamed into place only when complete and
validated, so no partial output is ever visible. It then records the manifest and, when asked, uploads the dataset's
files to the Hub in one commit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from rqvae_ray.core.rows import pid_break
from rqvae_ray.errors import OutputError, OutputWriteError, UploadError
from rqvae_ray.outputs.layout import MANIFEST_FILE, output_dir, repo_folder, written_filenames
from rqvae_ray.outputs.manifest import ExportRecord, ExtendedFile, Manifest, ManifestEntry, utc_now
from rqvae_ray.outputs.resume import remove_resume_state
from rqvae_ray.outputs.sinks.model_sink import ModelSink
from rqvae_ray.outputs.staging import folder_lock, remove_stale_partials
from rqvae_ray.outputs.targets import DatasetOutput, Published, Refused

if TYPE_CHECKING:
    from rqvae_ray.outputs.upload import Preuploaded

# How often the writer makes its journals safe on disk: an interrupted run is resumed from the last checkpoint.
CHECKPOINT_S = 2.0


def _unwritable(exc: OSError, folder: Path) -> OutputError:
    """One line for an output folder that cannot be written, saying read-only where it is."""
    where = exc.filename or folder
    read_only = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    why = f"{exc.strerror}: it is read-only for this process" if read_only else exc.strerror
    return OutputError(f"cannot write in {where} ({why}); choose a writable --out-dir", path=str(where))


def _cannot_write(exc: OSError, folder: Path, temporary: bool, file: str = "") -> OutputError:
    """One line for an OSError met writing in ``folder`` (about one model's ``file``, when given): the folder, the
    cause in words and what to do (``temporary``: an upload-only run's folder under TMPDIR)."""
    elsewhere = "set TMPDIR to another folder" if temporary else "choose another --out-dir"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        why, todo = "no space left on the device", f"free space or {elsewhere}"
    elif not folder.is_dir():
        why, todo = "the folder was removed during the run", "rerun to write its files again"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why, todo = "permission denied", f"make the folder writable or {elsewhere}"
    elif exc.errno == errno.EROFS:
        why, todo = "the filesystem is read-only", elsewhere
    else:
        why, todo = exc.strerror or type(exc).__name__, f"check the folder or {elsewhere}"
    where = f"{file} in {folder}" if file else f"in {folder}"
    return OutputWriteError(f"cannot write {where}: {why}; {todo}", path=str(folder / file if file else folder))


def _changed_reason(sink: ModelSink) -> str:
    return (
        f"{sink.changed} POI(s) already in {sink.target.filename} now get another SID (first Pid "
        f"{sink.kept.first_changed}): their features changed since it was written; --force redoes the file from scratch"
    )


def _refuse_shared_names(sinks: list[ModelSink]) -> None:
    """Two models must not write one file: the 0-based index map's name spells a model's dots as underscores."""
    owners: dict[str, str] = {}
    for sink in sinks:
        exported = sink.exports.files if sink.exports is not None else []
        for name in (sink.final.name, *(e.final.name for e in exported)):
            other = owners.setdefault(name, sink.target.model_id)
            if other != sink.target.model_id:
                raise OutputError(
                    f"{other} and {sink.target.model_id} would both write {name}; run them in separate --out-dir "
                    "folders or drop the --for preset that writes it"
                )


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class DatasetWriter:
    """Writes every model's output of one dataset (in the executor's process, or in Ray's writer actor).

    A folder of None means upload-only: files are written under a private temporary directory on this node, which is
    removed after a successful upload and kept (and named in the error) when the upload fails. Blocks start at Pid
    ``first_pid``: a model whose file starts with existing rows needs none of them, and ignores those it is given
    unless it verifies them.
    """

    def __init__(self, output: DatasetOutput) -> None:
        self._abort_lock = threading.Lock()
        self._aborted = False
        self.repo = output.repo
        self.spec = output.spec
        self.num_pois = output.num_pois
        self.base_folder = output.base_folder
        self.temporary = output.folder is None
        self.root = Path(tempfile.mkdtemp(prefix="rqvae_ray-out-")) if self.temporary else None
        self.folder = output_dir(self.root, self.repo, self.base_folder) if self.temporary else output.folder
        self.sinks: list[ModelSink] = []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.folder)
            for target in output.targets:
                self.sinks.append(ModelSink(target, self.folder / target.filename, self.spec, self.num_pois))
            _refuse_shared_names(self.sinks)
            for sink in self.sinks:
                if sink.target.resume_rows:
                    sink.replay()
        except OSError as exc:
            self.abort()
            raise _unwritable(exc, self.folder) from None
        except BaseException:
            self.abort()
            raise
        # Each model's file is written by a thread of its own (formatting, Parquet encoding, hashing and writing
        # release the GIL): the files of a block are written side by side, not one after another.
        self._threads = ThreadPoolExecutor(len(self.sinks), "rqvae_ray-sink") if len(self.sinks) > 1 else None
        self.next_pid = output.first_pid
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
        broken = pid_break(pids, self.next_pid)
        if broken is not None:
            row, expected = broken
            raise OutputError(
                f"{self.repo}: rows arrived out of Pid order (Pid {int(pids[row])} where {expected} was "
                "expected); the input's Pids must run 1..N in order"
            )
        try:
            self._each_sink(lambda sink: sink.append(block))
        except OSError as exc:
            raise _cannot_write(exc, self.folder, self.temporary) from None
        self.next_pid += len(pids)
        if time.monotonic() - self._checkpointed >= CHECKPOINT_S:
            self.checkpoint()
        return self.next_pid - 1

    def _each_sink(self, work) -> None:
        """``work(sink)`` for every sink, side by side; once all are done, the first sink's error is raised."""
        if self._threads is None:
            for sink in self.sinks:
                work(sink)
            return
        done = [self._threads.submit(work, sink) for sink in self.sinks]
        wait(done)
        for future in done:
            future.result()

    def _stop_threads(self) -> None:
        """Wait for the sinks' threads to finish what they write, and end them."""
        threads = getattr(self, "_threads", None)  # absent when opening failed
        if threads is not None:
            threads.shutdown(wait=True)

    def checkpoint(self) -> None:
        """Make every file's SIDs so far safe on disk, so that an interrupted run resumes from here."""
        try:
            self._each_sink(lambda sink: sink.checkpoint())
        except OSError as exc:
            raise _cannot_write(exc, self.folder, self.temporary) from None
        self._checkpointed = time.monotonic()

    def finish(self) -> list[Published | Refused]:
        """Validate every file, rename it and its exports into place and update the manifest; one result per model
        (a :class:`Refused` one for a model whose kept POIs now get other SIDs or whose files cannot be put in place).
        """
        self._stop_threads()
        if not self.folder.is_dir():  # removed during the run: closing the exports would fail on their own names
            self.abort()
            gone = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
            raise _cannot_write(gone, self.folder, self.temporary)
        try:
            for sink in self.sinks:
                sink.close()
        except OSError as exc:
            self.abort()
            raise _cannot_write(exc, self.folder, self.temporary) from None
        except BaseException:
            self.abort()
            raise
        if self.next_pid - 1 != self.num_pois:
            self.abort()
            raise OutputError(f"{self.repo}: wrote {self.next_pid - 1} rows but the dataset has {self.num_pois} POIs")
        try:
            with folder_lock(self.folder):  # another run into this folder may be publishing now
                manifest = Manifest.read(self.folder, self.repo)
                results = [self._publish(sink, manifest) for sink in self.sinks]
                manifest.write()
        except OSError as exc:
            self.abort()
            raise _cannot_write(exc, self.folder, self.temporary) from None
        return results

    def _publish(self, sink: ModelSink, manifest: Manifest) -> Published | Refused:
        """Rename one model's file and its exports into place, delete the exports it no longer has, and enter it in
        ``manifest`` (a model whose kept POIs now get other SIDs, or whose files cannot be put in place, is refused
        and its partial files dropped)."""
        if sink.changed:
            sink.discard()
            return Refused(sink.target.model_id, _changed_reason(sink))
        exported = sink.exports.files if sink.exports is not None else []
        moves = [(sink.partial, sink.final), *((e.partial, e.final) for e in exported)]
        try:
            for stale in self._stale_exports(sink, manifest):
                stale.unlink(missing_ok=True)
            for partial, final in moves:
                os.replace(partial, final)
        except OSError as exc:
            sink.discard()
            failure = _cannot_write(exc, self.folder, self.temporary, sink.target.filename)
            return Refused(sink.target.model_id, failure.message)
        self.published.extend(final for _, final in moves)
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
            sid_stats=sink.quality(),
            encode_seconds=round(sink.encode_seconds, 3),
            sinkhorn_levels=list(sink.target.sinkhorn_levels),
            fixed_length=self.spec.fixed_length,
            max_per_sid=self.spec.max_per_sid or 0,
            exports=[ExportRecord(e.export.value, e.final.name, e.sha256) for e in exported],
            features_rows_sha256=sink.target.features_rows_sha256,
            extends=None if existing is None else ExtendedFile(existing.sha256, existing.rows),
            **vars(sink.target.provenance),
        )
        manifest.entries[entry.file] = entry
        self.published_entries[entry.file] = entry
        with contextlib.suppress(OSError):  # the file is published: the next run that writes it replaces the state
            remove_resume_state(sink.final)
        return Published(entry, str(sink.final))

    def _stale_exports(self, sink: ModelSink, manifest: Manifest) -> list[Path]:
        """The files exported beside ``sink``'s file that this run does not write: every name an export or a preset
        file of it may have (the names a manifest entry lists its exports by), but those that the entry of the
        model's file in the other format lists."""
        name = sink.target.filename
        written = {e.final.name for e in sink.exports.files} if sink.exports is not None else set()
        others = {record.file for file, entry in manifest.entries.items() if file != name for record in entry.exports}
        names = written_filenames(name) - written - others
        return [self.folder / stale for stale in sorted(names)]

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """Commit this run's files to the dataset repo (see :func:`commit_dataset`); returns the commit oid."""
        entries = list(self.published_entries.values())
        files = repo_files(self.folder, self.base_folder, entries)
        oid = commit_dataset(self.repo, self.base_folder, entries, message, retries, backoff_s, files=files)
        self.release()
        return oid

    def preupload(self, retries: int, backoff_s: float) -> Preuploaded:
        """This run's files, pre-uploaded from this node for the commit that the driver makes (see
        :func:`~rqvae_ray.outputs.upload.preupload_files`)."""
        from rqvae_ray.outputs.upload import Preuploaded, preupload_files

        kept_in = f"{self.folder} on {socket.gethostname()}"
        files = repo_files(self.folder, self.base_folder, list(self.published_entries.values()))
        try:
            return Preuploaded(preupload_files(self.repo, files, retries, backoff_s), kept_in)
        except UploadError as exc:
            raise UploadError(f"{exc}; the finished files are kept in {kept_in}", repo=self.repo) from None

    def release(self) -> None:
        """Remove an upload-only run's temporary folder, once its files are committed."""
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def abort(self, keep_resume: bool = False) -> None:
        """Drop every unpublished file; with ``keep_resume`` (an interrupted run) keep what the next run resumes.

        Once only: a stopping run aborts a dataset that does not stop in time from its main thread, while the
        dataset's own thread may reach its next block and abort too; the later call returns when the first is done.
        """
        with self._abort_lock:
            if self._aborted:
                return
            self._aborted = True
            self._stop_threads()
            for sink in self.sinks:
                sink.discard(keep_resume)
            if self.root is not None and not self.published:
                shutil.rmtree(self.root, ignore_errors=True)


def repo_files(folder: Path, base_folder: str, entries: list[ManifestEntry]) -> list[tuple[Path, str]]:
    """The files of ``entries`` in ``folder`` (each codebooks file and its exports), with their paths in the repo."""
    prefix = repo_folder(base_folder)
    names = [name for entry in entries for name in (entry.file, *(record.file for record in entry.exports))]
    return [(folder / name, f"{prefix}/{name}") for name in names]


def commit_dataset(
    repo: str,
    base_folder: str,
    entries: list[ManifestEntry],
    message: str,
    retries: int,
    backoff_s: float,
    files: list[tuple[Path, str]] = (),
    preuploaded: list[Preuploaded] = (),
) -> str:
    """Commit the finished files of ``entries`` to dataset repo ``repo`` in one commit: ``files`` from this node
    (see :func:`repo_files`) and those ``preuploaded`` from others, with the repo's manifest updated by ``entries``
    (the repo's entries of other files stay, whatever a folder's manifest holds); returns the commit oid."""
    from rqvae_ray.outputs.upload import ManifestUpdate, commit_files

    prefix = repo_folder(base_folder)
    prepared = [operation for part in preuploaded for operation in part.operations]

    def repo_manifest(current: bytes | None) -> bytes:
        where = f"{prefix}/{MANIFEST_FILE} of dataset repo {repo}"
        manifest = Manifest.parse(Path(prefix), repo, current, where=where)
        manifest.entries.update({entry.file: entry for entry in entries})
        return manifest.to_bytes()

    manifest = ManifestUpdate(f"{prefix}/{MANIFEST_FILE}", repo_manifest)
    try:
        return commit_files(repo, list(files), message, retries, backoff_s, manifest=manifest, prepared=prepared)
    except UploadError as exc:
        folders = dict.fromkeys([*(str(path.parent) for path, _ in files), *(part.kept_in for part in preuploaded)])
        raise UploadError(f"{exc}; the finished files are kept in {', '.join(folders)}", repo=repo) from None
