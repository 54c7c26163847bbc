"""The final writer: appends each model's ordered, pre-formatted parts to a staged file, validates, then publishes.

One writer serves one dataset. Blocks arrive in Pid order; the writer checks that Pids run 1..N without gaps,
counts SIDs as it goes (memory bounded by the codebook sizes) and hashes the bytes it writes. Only a complete and
validated file is renamed into place, so no partial output is ever visible.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from rqvae_ray.formatting import CSV_HEADER, string_bytes
from rqvae_ray.sid_stats import SidCounter

STAGING_DIR = ".rqvae_ray-staging"


class OutputError(RuntimeError):
    """Output that cannot be written or fails validation; the message names the file and the fix."""


@dataclass(frozen=True)
class ModelTarget:
    """What the writer needs to know about one model's output."""

    model_id: str
    column: str  # prefix of this model's columns in the blocks
    filename: str  # e.g. codebooks-<model>.csv
    codebook_sizes: tuple[int, ...]


def output_relpath(repo: str, base_folder: str, filename: str) -> str:
    """Path of an output inside a hub tree: ``datasets/<org>/<dataset>/<base>/Intermediate Files/<file>``."""
    return f"datasets/{repo}/{base_folder}/Intermediate Files/{filename}"


class _Sink:
    """One model's staged output file."""

    def __init__(self, target: ModelTarget, staged: Path, fmt: str) -> None:
        self.target = target
        self.staged = staged
        self.fmt = fmt
        self.digest = hashlib.sha256()
        self.counter = SidCounter(target.codebook_sizes)
        self._parquet = None
        if fmt == "csv":
            self._handle = staged.open("wb")
            self._write(CSV_HEADER)

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self.digest.update(data)

    def append(self, block: pa.Table) -> None:
        column = self.target.column
        self.counter.add(block.column(f"{column}.sid").to_numpy())
        if self.fmt == "csv":
            self._write(string_bytes(block.column(f"{column}.csv")))
            return
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "Pid": block.column("Pid"),
                "Codebook": block.column(f"{column}.codebook"),
                "Vector": block.column(f"{column}.vector"),
            }
        )
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.staged, table.schema)
        self._parquet.write_table(table)

    def close(self) -> None:
        if self.fmt == "csv":
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
        elif self._parquet is not None:
            self._parquet.close()
        if self.fmt != "csv":
            self.digest.update(self.staged.read_bytes())


class DatasetWriter:
    """Writes every model's output of one dataset; runs as the final Ray actor (or in-process)."""

    def __init__(self, repo: str, targets: list[ModelTarget], out_dir: str, base_folder: str, fmt: str) -> None:
        self.repo = repo
        self.targets = targets
        self.out_dir = Path(out_dir)
        self.base_folder = base_folder
        self.fmt = fmt
        self.final_dir = self.out_dir / Path(output_relpath(repo, base_folder, "x")).parent
        self.staging = self.out_dir / STAGING_DIR / uuid.uuid4().hex
        try:
            self.final_dir.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create output directory {exc.filename}: {exc.strerror}; choose a writable --out-dir"
            ) from None
        self.sinks = [_Sink(t, self.staging / t.filename, fmt) for t in targets]
        self.next_pid = 1

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

    def finish(self, num_pois: int) -> list[dict]:
        """Validate every staged file and rename it into place; returns one result dict per model."""
        results = []
        for sink in self.sinks:
            sink.close()
        if self.next_pid - 1 != num_pois:
            self.abort()
            raise OutputError(f"{self.repo}: wrote {self.next_pid - 1} rows but the dataset has {num_pois} POIs")
        for sink in self.sinks:
            final = self.final_dir / sink.target.filename
            os.replace(sink.staged, final)
            results.append(
                {
                    "model_id": sink.target.model_id,
                    "path": str(final),
                    "rows": sink.counter.rows,
                    "sha256": sink.digest.hexdigest(),
                    "quality": sink.counter.summary(),
                }
            )
        shutil.rmtree(self.staging, ignore_errors=True)
        _remove_if_empty(self.staging.parent)
        return results

    def abort(self) -> None:
        """Drop every staged file."""
        for sink in self.sinks:
            try:
                sink.close()
            except (OSError, ValueError):
                pass
        shutil.rmtree(self.staging, ignore_errors=True)
        _remove_if_empty(self.staging.parent)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
