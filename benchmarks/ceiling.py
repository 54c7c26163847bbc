"""The ceiling of the pipeline: how fast it streams SID rows to disk when encoding costs nothing.

Each system is the real pipeline run through the Python API with the stand-in encoder (:mod:`benchmarks.stand_in`)
in a fresh subprocess, at two sizes of the NYC-shaped benchmark hub, so that start-up cancels out of the difference:
the SID rows/s streamed are the added SID rows over the added wall time. In the same run the disk writes the added
output bytes sequentially, fsync'd, both past the page cache (O_DIRECT, as the product writes where it can) and through
it; streaming/disk is the added wall time over the faster of the two (1.0: as fast as the disk).
The CPU seconds of every process role (:func:`benchmarks.measure.process_role`) are reported per added SID row.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measure import Measurement
from rqvae_ray.outputs.staging import direct_aligned, open_for_writing

CHUNK_BYTES = 8 << 20


def disk_write_seconds(folder: Path, nbytes: int, direct: bool) -> float:
    """Seconds to write ``nbytes`` (rounded up to 4 KiB) to a new file in ``folder`` sequentially and fsync it, past
    the page cache where the filesystem allows it (as the product writes, :func:`open_for_writing`) or through it; the
    file is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    chunk = mmap.mmap(-1, CHUNK_BYTES)  # page-aligned, as O_DIRECT needs
    chunk.write(os.urandom(CHUNK_BYTES))
    path = folder / f".disk-probe-{os.getpid()}"
    started = time.perf_counter()
    handle = open_for_writing(path, direct)[0]
    try:
        left = nbytes
        with memoryview(chunk) as view:
            while left > 0:
                left -= os.write(handle, view[: min(direct_aligned(left), CHUNK_BYTES)])
        os.fsync(handle)
    finally:
        os.close(handle)
    seconds = time.perf_counter() - started
    path.unlink()
    chunk.close()
    return seconds


def output_bytes(out_dir: Path) -> int:
    """Bytes of the codebooks files a run published under ``out_dir``."""
    return sum(path.stat().st_size for path in out_dir.rglob("codebooks-*") if path.is_file())


def _load(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


@dataclass
class Pair:
    """One measured run at each size, and the disk writing the bytes the larger one added (past the page cache, and
    through it)."""

    small: Measurement
    big: Measurement
    added_bytes: int
    direct_disk_s: float
    cached_disk_s: float

    @property
    def disk_s(self) -> float:
        """The disk's time for the bytes, written the faster way."""
        return min(self.direct_disk_s, self.cached_disk_s)

    @property
    def added_wall_s(self) -> float:
        return self.big.wall_s - self.small.wall_s

    @property
    def ok(self) -> bool:
        return self.small.returncode == 0 and self.big.returncode == 0


@dataclass
class Ceiling:
    """Every pair of runs of one system (executor and format)."""

    executor: str
    fmt: str
    pois: tuple[int, int]
    models: int
    pairs: list[Pair] = field(default_factory=list)

    @property
    def added_sid_rows(self) -> int:
        return (self.pois[1] - self.pois[0]) * self.models

    @property
    def ok(self) -> bool:
        return bool(self.pairs) and all(pair.ok for pair in self.pairs)

    def _median(self, values) -> float:
        return statistics.median(list(values))

    @property
    def added_wall_s(self) -> float:
        return self._median(pair.added_wall_s for pair in self.pairs)

    @property
    def disk_s(self) -> float:
        return self._median(pair.disk_s for pair in self.pairs)

    @property
    def added_bytes(self) -> int:
        return int(self._median(pair.added_bytes for pair in self.pairs))

    @property
    def rows_per_s(self) -> float:
        return self.added_sid_rows / self.added_wall_s if self.added_wall_s > 0 else float("inf")

    @property
    def ratio(self) -> float:
        """Streaming time over the disk's time for the same bytes (medians over the pairs)."""
        return self.added_wall_s / self.disk_s

    @property
    def cached_ratio(self) -> float:
        """Streaming time over the time of the same bytes written through the page cache (how this was measured
        before the product wrote past it)."""
        return self.added_wall_s / self._median(pair.cached_disk_s for pair in self.pairs)

    def cpu(self) -> dict[str, tuple[float, float]]:
        """Per process role, the median CPU seconds of the larger runs and the µs per added SID row."""
        roles = sorted({role for pair in self.pairs for role in (*pair.small.cpu_by_role, *pair.big.cpu_by_role)})
        figures = {}
        for role in roles:
            big = self._median(pair.big.cpu_by_role.get(role, 0.0) for pair in self.pairs)
            added = self._median(
                pair.big.cpu_by_role.get(role, 0.0) - pair.small.cpu_by_role.get(role, 0.0) for pair in self.pairs
            )
            figures[role] = (big, 1e6 * added / self.added_sid_rows)
        return figures

    def summary(self) -> dict:
        return {
            "executor": self.executor,
            "format": self.fmt,
            "pois": list(self.pois),
            "models": self.models,
            "ok": self.ok,
            "added_sid_rows": self.added_sid_rows,
            "added_wall_s_median": self.added_wall_s if self.pairs else None,
            "sid_rows_per_s": self.rows_per_s if self.pairs else None,
            "added_bytes": self.added_bytes if self.pairs else None,
            "disk_s_median": self.disk_s if self.pairs else None,
            "streaming_over_disk": self.ratio if self.pairs else None,
            "streaming_over_cached_disk": self.cached_ratio if self.pairs else None,
            "cpu_s_big_and_us_per_added_row": self.cpu() if self.pairs else {},
            "runs": [
                {
                    "small_wall_s": pair.small.wall_s,
                    "big_wall_s": pair.big.wall_s,
                    "added_bytes": pair.added_bytes,
                    "disk_s": pair.disk_s,
                    "direct_disk_s": pair.direct_disk_s,
                    "cached_disk_s": pair.cached_disk_s,
                    "small_cpu": pair.small.cpu_by_role,
                    "big_cpu": pair.big.cpu_by_role,
                    "load": [pair.small.load_before, pair.big.load_after],
                }
                for pair in self.pairs
            ],
        }

    def report(self) -> list[str]:
        """The lines that print this system's figures."""
        small, big = self.pois
        lines = [
            f"{self.fmt} on {self.executor}: {small:,} -> {big:,} POIs x {self.models} models, {len(self.pairs)} "
            f"pair(s): +{self.added_sid_rows:,} SID rows in +{self.added_wall_s:.1f} s = {self.rows_per_s:,.0f} "
            f"SID rows/s; +{self.added_bytes / 1e9:.2f} GB, the disk writes them in {self.disk_s:.1f} s "
            f"({self.added_bytes / self.disk_s / 1e6:,.0f} MB/s); streaming/disk {self.ratio:.2f}x "
            f"(the disk through the page cache: {self.cached_ratio:.2f}x)",
            "  the disk (write + fsync; past the page cache, through it): "
            + ", ".join(f"({pair.direct_disk_s:.1f}, {pair.cached_disk_s:.1f})" for pair in self.pairs),
            "  walls (small, big): "
            + ", ".join(f"({pair.small.wall_s:.1f}, {pair.big.wall_s:.1f})" for pair in self.pairs)
            + "; 1-min load avg "
            + ", ".join(f"{_load(pair.small.load_before)}->{_load(pair.big.load_after)}" for pair in self.pairs),
            f"  CPU s at {big:,} POIs (us per added SID row):",
        ]
        for role, (seconds, per_row) in self.cpu().items():
            lines.append(f"    {role:<34} {seconds:8.1f} s  ({per_row:5.2f} us)")
        return lines
