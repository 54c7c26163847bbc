"""The final writer: appends each model's ordered, pre-formatted parts to a staged file, validates, then publishes.

One writer serves one dataset. Blocks arrive in Pid order; the writer checks that Pids run 1..N without gaps and
that every code fits its codebook, counts SIDs as it goes (memory bounded by the codebook sizes) and hashes the bytes
it writes. Only a complete, validated file is renamed into place, so no partial output is ever visible. It then
records a manifest beside the outputs and, when asked, uploads the dataset's files to the Hub in one commit.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from rqvae_ray import __version__
from rqvae_ray.errors import OutputError, UploadError
from rqvae_ray.formatting import (
    CSV_HEADER,
    CSV_HEADER_WITH_SID,
    csv_lines,
    string_bytes,
    with_dedup_codes,
    with_dedup_tokens,
)
from rqvae_ray.sid_stats import SidCounter

STAGING_DIR = ".rqvae_ray-staging"
MANIFEST_FILE = "rqvae_ray-manifest.json"


@dataclass(frozen=True)
class ModelTarget:
    """What the writer needs to know about one model's output."""

    model_id: str
    column: str  # prefix of this model's columns in the blocks
    filename: str  # e.g. codebooks-<model>.csv
    codebook_sizes: tuple[int, ...]
    provenance: dict = field(default_factory=dict)  # checkpoint/features sha256 and revisions


def output_dir(root: Path, repo: str, base_folder: str) -> Path:
    """``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files``."""
    return root / "datasets" / repo / base_folder / "Intermediate Files"


def read_manifest(folder: Path) -> dict:
    """The manifest in ``folder`` (empty when absent or unreadable)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return {"models": {}}
    return manifest if isinstance(manifest.get("models"), dict) else {"models": {}}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    staged.write_bytes(data)
    os.replace(staged, path)


class _Sink:
    """One model's staged output file.

    With ``dedup`` the rows first go to a spool file (Arrow IPC, on disk) while every SID is counted; closing the
    sink then streams the spool once more, adding each shared SID's extra code in Pid order.
    """

    def __init__(self, target: ModelTarget, staged: Path, fmt: str, dedup: bool, tokens: bool) -> None:
        self.target = target
        self.staged = staged
        self.fmt = fmt
        self.dedup = dedup
        self.tokens = tokens
        self.digest = hashlib.sha256()
        self.counter = SidCounter(target.codebook_sizes)
        self.closed = False
        self._parquet = None
        self._spool = None
        self._spool_path = staged.with_name(staged.name + ".spool")
        # Both formats write through one hashing file: CSV text directly, Parquet through pyarrow's writer.
        self._handle = _HashingFile(staged, self.digest) if fmt == "csv" else None
        if self._handle is not None:
            self._handle.write(CSV_HEADER_WITH_SID if tokens else CSV_HEADER)

    def append(self, block: pa.Table) -> None:
        prefix = f"{self.target.column}."
        sids = block.column(prefix + "sid").to_numpy()
        if len(sids) and (sids.min() < 0 or sids.max() >= self.counter.space):
            raise OutputError(f"{self.target.model_id}: a code falls outside the codebook sizes; output rejected")
        self.counter.add(sids)
        columns = {"Pid": block.column("Pid")}
        columns.update(
            {name[len(prefix) :]: block.column(name) for name in block.column_names if name.startswith(prefix)}
        )
        table = pa.table(columns)
        if not self.dedup:
            self._emit(table, None)
            return
        if self._spool is None:
            self._spool = pa.ipc.new_file(self._spool_path, table.schema)
        self._spool.write_table(table)

    def _emit(self, table: pa.Table, extra: np.ndarray | None) -> None:
        if self.fmt == "csv":
            if extra is None and "csv" in table.column_names:
                self._handle.write(string_bytes(table.column("csv")))
                return
            parts = {k: table.column(k).combine_chunks() for k in ("head", "tail", "tokens") if k in table.column_names}
            self._handle.write(string_bytes(csv_lines(parts, extra, len(self.target.codebook_sizes))))
            return
        import pyarrow.parquet as pq

        codebook, columns = table.column("codebook"), {"Pid": table.column("Pid")}
        columns["Codebook"] = codebook if extra is None else with_dedup_codes(codebook, extra)
        columns["Vector"] = table.column("vector")
        if self.tokens:
            tokens = table.column("tokens").combine_chunks()
            levels = len(self.target.codebook_sizes)
            columns["SID"] = tokens if extra is None else with_dedup_tokens(tokens, extra, levels)
        out = pa.table(columns)
        if self._parquet is None:
            self._handle = _HashingFile(self.staged, self.digest)
            # Dictionary encoding is retried for every row group and costs ~8x the CPU of the plain encoding on
            # the float Vector column, for a larger file; only the SID strings repeat enough to gain from it.
            dictionary = ["SID"] if self.tokens else False
            self._parquet = pq.ParquetWriter(self._handle, out.schema, use_dictionary=dictionary)
        self._parquet.write_table(out)

    def _replay_spool(self) -> None:
        if self._spool is None:
            return
        self._spool.close()
        with pa.memory_map(str(self._spool_path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                table = pa.Table.from_batches([reader.get_batch(index)])
                self._emit(table, self.counter.dedup_codes(table.column("sid").to_numpy()))
        self._spool_path.unlink()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._replay_spool()
        if self._parquet is not None:
            self._parquet.close()
        if self._handle is not None:
            self._handle.close()  # flushes and fsyncs; Parquet may have closed it already, which is harmless


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


class DatasetWriter:
    """Writes every model's output of one dataset; runs as the final Ray actor (or in-process).

    ``out_dir`` None means upload-only: files are staged under a private temporary directory on this node, which is
    removed after a successful upload and kept (and named in the error) when the upload fails.
    """

    def __init__(
        self,
        repo: str,
        targets: list[ModelTarget],
        out_dir: str | None,
        base_folder: str,
        fmt: str,
        num_pois: int,
        dedup: bool = False,
        tokens: bool = False,
    ) -> None:
        self.repo = repo
        self.targets = targets
        self.base_folder = base_folder
        self.fmt = fmt
        self.num_pois = num_pois
        self.temporary = out_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="rqvae_ray-out-")) if out_dir is None else Path(out_dir)
        self.final_dir = output_dir(self.root, repo, base_folder)
        self.staging = self.root / STAGING_DIR / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            self.final_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_staging(self.staging.parent)
            self.staging.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create output directory {exc.filename}: {exc.strerror}; choose a writable --out-dir"
            ) from None
        self.sinks = [_Sink(t, self.staging / t.filename, fmt, dedup, tokens) for t in targets]
        self.dedup, self.tokens = dedup, tokens
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
            raise OutputError(f"{self.repo}: rows arrived out of Pid order (expected Pid {self.next_pid} next)")
        for sink in self.sinks:
            sink.append(block)
        self.next_pid += len(pids)
        return self.next_pid - 1

    def finish(self) -> list[dict]:
        """Validate every staged file, rename it into place and update the manifest; one result per model."""
        for sink in self.sinks:
            sink.close()
        if self.next_pid - 1 != self.num_pois:
            self.abort()
            raise OutputError(f"{self.repo}: wrote {self.next_pid - 1} rows but the dataset has {self.num_pois} POIs")
        manifest = read_manifest(self.final_dir)
        results = []
        for sink in self.sinks:
            final = self.final_dir / sink.target.filename
            os.replace(sink.staged, final)
            self.published.append(final)
            entry = {
                "model_id": sink.target.model_id,
                "file": sink.target.filename,
                "format": self.fmt,
                "dedup": self.dedup,
                "sid_tokens": self.tokens,
                "rows": sink.counter.rows,
                "sha256": sink.digest.hexdigest(),
                "tool_version": __version__,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **sink.target.provenance,
                "sid_stats": sink.counter.summary(),
            }
            manifest["models"][sink.target.model_id] = entry
            results.append({**entry, "path": str(final)})
        manifest.update({"tool": "rqvae_ray", "dataset": self.repo})
        _atomic_write(self.final_dir / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True).encode())
        shutil.rmtree(self.staging, ignore_errors=True)
        _remove_if_empty(self.staging.parent)
        return results

    def upload(self, message: str, retries: int, backoff_s: float) -> str:
        """Commit this run's files and the manifest to the dataset repo; returns the commit oid."""
        from rqvae_ray.upload import commit_files

        prefix = f"{self.base_folder}/Intermediate Files"
        files = [(path, f"{prefix}/{path.name}") for path in [*self.published, self.final_dir / MANIFEST_FILE]]
        try:
            oid = commit_files(self.repo, files, message, retries=retries, backoff_s=backoff_s)
        except UploadError as exc:
            raise UploadError(f"{exc}; the finished files are kept in {self.final_dir}", repo=self.repo) from None
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
        return oid

    def abort(self) -> None:
        """Drop every staged (unpublished) file."""
        for sink in self.sinks:
            try:
                sink.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.staging, ignore_errors=True)
        _remove_if_empty(self.staging.parent)
        if self.temporary and not self.published:
            shutil.rmtree(self.root, ignore_errors=True)


def _remove_stale_staging(staging_root: Path) -> None:
    """Delete staging folders left by writers on this host that no longer run (e.g. after SIGKILL)."""
    if not staging_root.is_dir():
        return
    host = socket.gethostname()
    for folder in staging_root.iterdir():
        parts = folder.name.rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
