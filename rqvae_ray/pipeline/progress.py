"""What a run reports while it works: notes (one line each) and rows written per dataset."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    """Receives a run's reports; this one prints notes, and a line of rows written at most every ``every_s``."""

    def __init__(self, echo: Callable[[str], object] = print, every_s: float = 5.0) -> None:
        self.echo = echo
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def note(self, text: str) -> None:
        """One line about the run (a dataset loaded, a model skipped, a plan chosen, a file published)."""
        self.echo(text)

    def dataset_started(self, repo: str, pois: int, models: int) -> None:
        """Encoding of ``repo`` (``pois`` POIs for ``models`` models) begins."""
        self._last[repo] = time.monotonic()

    def rows_written(self, repo: str, rows: int, pois: int, models: int) -> None:
        """``rows`` of ``pois`` POIs of ``repo`` are written for every one of its ``models`` models."""
        now = time.monotonic()
        if now - self._last.get(repo, 0.0) >= self.every_s:
            self._last[repo] = now
            self.echo(f"{repo}: {rows}/{pois} POIs written for {models} models")

    def dataset_finished(self, repo: str, pois: int, models: int) -> None:
        self.echo(f"{repo}: {pois} POIs written for {models} models")

    def stopping(self) -> None:
        """The run is stopping (Ctrl-C, a stop signal, a lost cluster): each dataset stops at its next block."""


class Quiet(Progress):
    """Reports nothing."""

    def __init__(self) -> None:
        super().__init__(lambda _text: None)
