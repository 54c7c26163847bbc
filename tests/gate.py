"""A gate in a run's encoders, so that a test can catch a run in the middle of a dataset whatever the machine's speed.

:class:`Gate` is an ``encoder_factory`` (:class:`rqvae_ray.pipeline.options.RunOptions`): it builds each model's real
encoder (:func:`rqvae_ray.core.encoder.make_encoder`), and for the models that take ``input_dim`` features it wraps
it in an encoder that encodes a batch only once the test has let rows through. It is picklable and importable in
Ray's workers (the CLI runs with the repo root as its working directory), so it gates the encoder actors too.

The gate is a folder of small files that the test and the encoders share (each encoder may be in another process):

* ``allow``: how many rows of each gated model may be encoded, written by the test (:class:`GateControl`);
* ``passed-<model>``: how many rows of that model were let through, kept by the encoders under ``lock``.

A batch is let through whole as soon as fewer rows than allowed have passed before it, so each model encodes at most
the allowance plus one batch, however many actors or threads encode it. A batch waits at most :data:`DEADLINE_S`.

:class:`GateControl` is the test's side; ``python -m tests.gated_cli FOLDER INPUT_DIM ARGS...`` runs the command
line with the gate.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.core.encoder import Encoder, SparseRows, make_encoder

POLL_S = 0.02  # how often a waiting batch looks at the allowance
DEADLINE_S = 300.0  # a batch still held after this long fails its run
ALLOW_FILE = "allow"
LOCK_FILE = "lock"
PASSED_PREFIX = "passed-"
OPEN_ROWS = 1 << 62  # an allowance no dataset reaches
TKY_INPUT_DIM = 2569  # the demo TKY models' input features (the NYC models take 1407)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def _write_int(path: Path, value: int) -> None:
    """Replace ``path``'s number at once (a reader sees the old number or the new one)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(str(value))
    os.replace(temporary, path)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """The gate's lock (between processes, and between threads, each of which opens the file itself)."""
    with (folder / LOCK_FILE).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Gate:
    """An ``encoder_factory``: the real encoders, those of the models of ``input_dim`` features behind the gate in
    ``folder``."""

    def __init__(self, folder: str | Path, input_dim: int = TKY_INPUT_DIM) -> None:
        self.folder = str(folder)
        self.input_dim = input_dim

    def open(self) -> None:
        """Let every gated model through, whatever the test allowed."""
        _write_int(Path(self.folder) / ALLOW_FILE, OPEN_ROWS)

    def __call__(self, weights: ModelWeights, use_gpu: bool = False) -> Encoder:
        encoder = make_encoder(weights, use_gpu)
        if weights.input_dim != self.input_dim:
            return encoder
        return _GatedEncoder(encoder, Path(self.folder), weights.sha256[:16])  # type: ignore[return-value]


class _GatedEncoder:
    """``inner``, except that each batch first waits at the gate; its rows count as passed for model ``key``."""

    def __init__(self, inner: Encoder, folder: Path, key: str) -> None:
        self.inner = inner
        self.folder = folder
        self.passed = folder / f"{PASSED_PREFIX}{key}"
        with _locked(folder):  # the test sees the model once it has an encoder, before its first batch
            if not self.passed.exists():
                _write_int(self.passed, 0)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def encode(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        codes = self.codes(rows)
        return codes, self.inner.vectors(codes)

    def codes(self, rows: SparseRows) -> np.ndarray:
        self._wait(rows.num_rows)
        return self.inner.codes(rows)

    def encode_latent(self, rows: SparseRows) -> tuple[np.ndarray, np.ndarray]:
        self._wait(rows.num_rows)
        return self.inner.encode_latent(rows)

    def _wait(self, rows: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with _locked(self.folder):
                passed = _read_int(self.passed)
                if passed < _read_int(self.folder / ALLOW_FILE):
                    _write_int(self.passed, passed + rows)
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test's gate in {self.folder} held a batch for {DEADLINE_S:.0f} s")
            time.sleep(POLL_S)


class GateControl:
    """The test's side of the gate in ``folder`` (created closed: no row may pass)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.allowed = 0
        _write_int(folder / ALLOW_FILE, 0)

    def allow(self, rows: int) -> None:
        """Let each gated model encode ``rows`` rows (plus at most the batch that crosses the number)."""
        self.allowed = rows
        _write_int(self.folder / ALLOW_FILE, rows)

    def passed(self) -> list[int]:
        """The rows let through so far, per gated model that has an encoder."""
        with _locked(self.folder):
            return [_read_int(path) for path in self.folder.glob(f"{PASSED_PREFIX}*")]

    def open_until(
        self,
        state: Callable[[], bool],
        running: Callable[[], bool],
        limit: int,
        what: str,
        output: Callable[[], str] = str,
        step_s: float = 0.25,
        wait_s: float = 300.0,
    ) -> None:
        """Let the gated models through a batch at a time until ``state()`` holds: the next batch once every gated
        model has taken what it was allowed, and at least ``step_s`` after the last one (the writer makes resume
        state only once a few seconds have gone by, so it must see rows arrive over time, not all at once). Fails,
        with the run's ``output()``, if the run ends first (``running()`` is false), if a gated model would be let
        through ``limit`` rows (the test's dataset must never be let through whole) or after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        stepped = time.monotonic()
        while not state():
            assert running(), f"the run ended before {what}: {output()}"
            assert time.monotonic() < deadline, f"no {what} within {wait_s:.0f} s ({self.allowed} rows): {output()}"
            passed = self.passed()
            if passed and min(passed) >= self.allowed and time.monotonic() - stepped >= step_s:
                assert max(passed) + 1 < limit, f"no {what} with {max(passed)} rows let through: {output()}"
                self.allow(max(passed) + 1)
                stepped = time.monotonic()
            time.sleep(POLL_S)
