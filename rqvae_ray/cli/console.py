"""The command line's console: the run's own lines on the terminal, everything else (Ray's) in the run's log file,
and a live progress view.

Ray and Ray Data write to this process's standard output and error from Python loggers, from C++ (the core
worker's log lines) and from the processes they start, which inherit the file descriptors. So :class:`RunConsole`
points descriptors 1 and 2 at the log file for the whole run, and the run's own lines go to duplicates of the
terminal's descriptors made before. With ``--debug`` nothing is redirected.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from rqvae_ray.pipeline.progress import Progress, Quiet

LOG_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rqvae_ray" / "logs"
# Run logs kept in LOG_DIR; older ones are removed when a run starts.
KEEP_LOGS = 20


def new_log_path() -> Path:
    """A new run log file in :data:`LOG_DIR` (the oldest logs beyond :data:`KEEP_LOGS` are removed)."""
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        logs = sorted(LOG_DIR.glob("run-*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[: max(0, len(logs) - KEEP_LOGS + 1)]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
    return LOG_DIR / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class RunConsole:
    """The terminal of a run: ``out`` and ``err`` reach the user; what Ray and the libraries print (descriptors 1
    and 2) goes to ``log_path``."""

    def __init__(self, log_path: Path | None) -> None:
        self.log_path = log_path
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self._saved: list[int] = []

    @contextmanager
    def captured(self):
        """Within: descriptors 1 and 2 write to the log file, ``out``/``err`` to the terminal."""
        if self.log_path is None:
            yield self
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._saved = [os.dup(1), os.dup(2)]
        self.out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        self.err = os.fdopen(os.dup(self._saved[1]), "w", buffering=1)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        try:
            yield self
        finally:
            self.restore()

    def restore(self) -> None:
        """Point descriptors 1 and 2 at the terminal again (idempotent)."""
        if not self._saved:
            return
        for stream in (sys.stdout, sys.stderr, self.out, self.err):
            stream.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = []
        self.out, self.err = sys.stdout, sys.stderr

    def echo(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err, flush=True)

    def warn(self, text: str) -> None:
        """A problem that does not fail the run."""
        print(f"warning: {text}", file=self.err, flush=True)

    def log_traceback(self, error: BaseException) -> None:
        """Write ``error``'s traceback to the run's log (on the terminal when the run has none: ``--debug``)."""
        text = "".join(traceback.format_exception(error))
        if self.log_path is None:
            print(text, file=self.err, end="", flush=True)
            return
        with self.log_path.open("a") as log:
            log.write(text)


class LiveProgress(Progress):
    """A live view on a terminal: one bar per dataset (POIs written of N, models, rate, time left); notes above it."""

    def __init__(self, stream: TextIO) -> None:
        self.console = Console(file=stream)
        super().__init__(self.console.print)
        self._bars = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("POIs x {task.fields[models]}"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def dataset_started(self, repo: str, pois: int, models: int) -> None:
        with self._lock:
            if not self._tasks:
                self._bars.start()
            self._tasks[repo] = self._bars.add_task(repo, total=pois, models=models, rate="")
            self._started[repo] = time.monotonic()

    def rows_written(self, repo: str, rows: int, pois: int, models: int) -> None:
        elapsed = max(time.monotonic() - self._started.get(repo, time.monotonic()), 1e-9)
        self._bars.update(self._tasks[repo], completed=rows, rate=f"{_compact(rows * models / elapsed)} SIDs/s")

    def dataset_finished(self, repo: str, pois: int, models: int) -> None:
        self.rows_written(repo, pois, pois, models)

    def stop(self) -> None:
        """End the live view (before the final table is printed)."""
        with self._lock:
            if self._tasks:
                self._bars.stop()


def _compact(value: float) -> str:
    """``value`` in at most 4 digits and a unit (``950``, ``12.3k``, ``4.1M``): the bar fits an 80-column terminal."""
    unit, size = next(((u, s) for u, s in (("G", 1e9), ("M", 1e6), ("k", 1e3)) if value >= s), ("", 1.0))
    number = value / size
    return f"{number:.1f}{unit}" if unit and number < 100 else f"{number:.0f}{unit}"


def make_progress(console: RunConsole, quiet: bool) -> Progress:
    """Live bars on a terminal; plain lines elsewhere (job logs, CI, ``ray job logs``); nothing with ``--quiet``."""
    if quiet:
        return Quiet()
    if console.out.isatty():
        return LiveProgress(console.out)
    return Progress(console.echo)
