"""Run a command as a subprocess and measure it: wall time, peak memory of its whole process tree, timestamped output.

Memory is sampled every ``poll_s`` seconds as the sum over the launched process and all its descendants (a local Ray
started by the driver is a descendant: gcs_server, raylet, its workers and agents). Processes whose command line
names the Ray session directory of one of those descendants are added too, in case one was re-parented. Two sums are
kept:

* RSS: resident set size summed over the processes (counts shared pages once per process: the object store in
  ``/dev/shm`` and shared libraries mapped by many workers are counted many times, so this over-states);
* PSS: proportional set size (each shared page divided among the processes sharing it), the fair "how much memory do
  these processes use together"; read from ``/proc/<pid>/smaps_rollup`` (Linux), sampled every ``pss_every`` polls
  because it is about 100 times more expensive to read than RSS.

The CPU seconds (user + system) of every process are kept as last sampled, summed per role (:func:`process_role`:
the driver, the writer actor, the encoder actors, Ray Data's read tasks, Ray's own processes); a process that ends
between two samples loses at most ``poll_s`` of its CPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

_SESSION_RE = re.compile(r"--session[-_]dir=(\S+)")


def _psutil():
    """psutil, from the environment or from the copy Ray ships in ``ray/thirdparty_files``."""
    try:
        import psutil
    except ImportError:
        spec = importlib.util.find_spec("ray")
        if spec is None or not spec.submodule_search_locations:
            raise
        sys.path.append(os.path.join(list(spec.submodule_search_locations)[0], "thirdparty_files"))
        import psutil
    return psutil


def _label(proc) -> str:
    """A short name for a process: Ray workers show their actor/task (``ray::MapWorker(...)``)."""
    try:
        cmdline = proc.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone; psutil raises its own error types
        return f"pid {proc.pid}"
    if not cmdline:
        return f"pid {proc.pid}"
    first = cmdline[0]
    if first.startswith("ray::"):
        return f"{first[:60]} (pid {proc.pid})"
    words = [os.path.basename(first)] + [w for w in cmdline[1:3] if not w.startswith("--")]
    return f"{' '.join(words)[:60]} (pid {proc.pid})"


DRIVER = "driver"
WRITER = "writer actor"
ENCODERS = "encoders (actors, or a small pool's tasks)"
READS = "read tasks"
OTHER_WORKERS = "other Ray workers"
IDLE_WORKERS = "idle Ray workers"
SPILLING = "object spilling (Ray's IO workers)"
RAY_OWN = "Ray's own (gcs, raylet, agents)"


def process_role(cmdline: list[str], is_root: bool) -> str:
    """What a process of a measured run is, from its command line (a Ray worker's is its process title, which names
    the task or actor it runs: ``ray::WriterActor.write``, ``ray::MapWorker(MapBatches(EncodeModels))``, a small
    pool's tasks ``ray::MapBatches(encode_in_task)``, ``ray::ReadPoi->...``, ``ray::IDLE``)."""
    if is_root:
        return DRIVER
    title = cmdline[0] if cmdline else ""
    if not title.startswith("ray::"):
        # A worker that has not set its title yet runs default_worker.py.
        return IDLE_WORKERS if any(word.endswith("default_worker.py") for word in cmdline) else RAY_OWN
    name = title[len("ray::") :]
    if "SpillWorker" in name or "RestoreWorker" in name:
        return SPILLING
    if name.startswith("IDLE"):
        return IDLE_WORKERS
    if name.startswith("WriterActor"):
        return WRITER
    if "EncodeModels" in name or "encode_in_task" in name:
        return ENCODERS
    if name.startswith("Read"):
        return READS
    return OTHER_WORKERS


def read_pss(pid: int) -> int | None:
    """Proportional set size of ``pid`` in bytes (Linux ``smaps_rollup``), None when unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as handle:
            for line in handle:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


@dataclass
class Measurement:
    """The outcome of one measured command."""

    command: list[str]
    returncode: int
    wall_s: float
    peak_rss: int  # bytes, peak of the sum over the process tree
    peak_pss: int | None  # bytes, peak of the PSS sum (None where PSS cannot be read)
    peak_processes: int  # most processes seen at once
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since start, output line)
    peak_breakdown: list[tuple[str, int]] = field(default_factory=list)  # (process, RSS bytes) at the RSS peak
    load_before: float | None = None  # 1-minute load average of the machine when the command started
    load_after: float | None = None  # ... and when it ended (others' work on a shared machine shows here)
    cpu_by_role: dict[str, float] = field(default_factory=dict)  # CPU seconds (user + system) per process role
    titles_by_role: dict[str, list[str]] = field(default_factory=dict)  # the process titles seen in each role

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def tail(self, count: int = 40) -> str:
        return "\n".join(line for _, line in self.lines[-count:])


class TreeSampler:
    """Samples the memory of a process tree (root plus descendants, plus processes of its Ray sessions)."""

    def __init__(self, root_pid: int, pss_every: int = 5) -> None:
        self.psutil = _psutil()
        self.root_pid = root_pid
        self.pss_every = max(1, pss_every)
        self.sessions: set[str] = set()
        self.samples = 0
        self.peak_rss = 0
        self.peak_pss: int | None = None
        self.peak_processes = 0
        self.peak_breakdown: list[tuple[str, int]] = []
        self._cmdline_seen: set[int] = set()
        self.cpu: dict[int, float] = {}  # CPU seconds of each process as last sampled
        self.roles: dict[int, str] = {}  # the role of each process: the first one it was seen in, past idling
        self.titles: dict[str, set[str]] = {}

    def cpu_by_role(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            role = self.roles[pid]
            totals[role] = totals.get(role, 0.0) + seconds
        return totals

    def _record_cpu(self, proc) -> None:
        try:
            times = proc.cpu_times()
            cmdline = proc.cmdline()
        except self.psutil.Error:
            return
        self.cpu[proc.pid] = times.user + times.system
        if self.roles.get(proc.pid, IDLE_WORKERS) == IDLE_WORKERS:
            self.roles[proc.pid] = process_role(cmdline, proc.pid == self.root_pid)
        self.titles.setdefault(self.roles[proc.pid], set()).add(" ".join(cmdline)[:100])

    def _processes(self) -> list:
        psutil = self.psutil
        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return []
        for proc in procs:
            if proc.pid in self._cmdline_seen:
                continue
            self._cmdline_seen.add(proc.pid)
            try:
                match = _SESSION_RE.search(" ".join(proc.cmdline()))
            except psutil.Error:
                continue
            if match:
                self.sessions.add(match.group(1))
        if self.sessions:
            known = {p.pid for p in procs}
            for proc in psutil.process_iter(["cmdline"]):
                if proc.pid in known:
                    continue
                cmdline = " ".join(proc.info.get("cmdline") or [])
                if any(session in cmdline for session in self.sessions):
                    procs.append(proc)
        return procs

    def sample(self) -> None:
        procs = self._processes()
        rss = 0
        alive = []
        sizes = []
        for proc in procs:
            try:
                size = proc.memory_info().rss
            except self.psutil.Error:
                continue
            rss += size
            alive.append(proc)
            self._record_cpu(proc)
            sizes.append(size)
        if rss > self.peak_rss:
            self.peak_rss = rss
            self.peak_breakdown = sorted(
                ((_label(proc), size) for proc, size in zip(alive, sizes, strict=True)), key=lambda item: -item[1]
            )
        self.peak_processes = max(self.peak_processes, len(alive))
        if self.samples % self.pss_every == 0:
            values = [read_pss(p.pid) for p in alive]
            known = [v for v in values if v is not None]
            if known:
                self.peak_pss = max(self.peak_pss or 0, sum(known))
        self.samples += 1


def run_measured(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    poll_s: float = 0.2,
    pss_every: int = 5,
    timeout_s: float | None = None,
    echo=None,
) -> Measurement:
    """Run ``command`` (stdout and stderr merged), sampling its process tree's memory every ``poll_s`` seconds.

    ``echo``, when given, is called with each output line as it arrives.
    """
    lines: list[tuple[float, str]] = []
    load_before = _load()
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=env,
        cwd=cwd,
        bufsize=1,
    )

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
            if echo is not None:
                echo(line.rstrip("\n"))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sampler = TreeSampler(proc.pid, pss_every=pss_every)
    returncode = None
    while returncode is None:
        sampler.sample()
        try:
            returncode = proc.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            if timeout_s is not None and time.perf_counter() - started > timeout_s:
                proc.kill()
                returncode = proc.wait()
    wall = time.perf_counter() - started
    thread.join(timeout=10)
    return Measurement(
        command=list(command),
        returncode=returncode,
        wall_s=wall,
        peak_rss=sampler.peak_rss,
        peak_pss=sampler.peak_pss,
        peak_processes=sampler.peak_processes,
        lines=lines,
        peak_breakdown=sampler.peak_breakdown,
        load_before=load_before,
        load_after=_load(),
        cpu_by_role=sampler.cpu_by_role(),
        titles_by_role={role: sorted(titles) for role, titles in sampler.titles.items()},
    )


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def bench_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for measured runs: private loopback-only local Ray, unbuffered output, no usage stats."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env
