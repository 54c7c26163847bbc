"""``python -m tests.gated_cli FOLDER INPUT_DIM ARGS...``: the command line (``python -m rqvae_ray.run ARGS...``)
with :class:`tests.gate.Gate` as its encoder factory, so that a test holds the models of ``INPUT_DIM`` features at the
gate in ``FOLDER``. Everything else is the command line's own: its options, signal handling and exit status.

Once the run is stopping (a signal, or a lost cluster: it has set the event that tells every dataset to stop at its
next block), the gate opens, so that a held dataset stops at its next block as an ungated run does, rather than
staying stuck at the gate (which the run only gives up on after a while). The stop is already decided when the gate
opens: every dataset stops at the first block it is let through, so none is finished by the rows let through.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

from rqvae_ray.cli import app
from rqvae_ray.pipeline import executor
from tests.gate import Gate


def main() -> None:
    folder, input_dim, *args = sys.argv[1:]
    gate = Gate(folder, int(input_dim))
    make_options = app.make_options

    def gated_options(**kwargs):
        return dataclasses.replace(make_options(**kwargs), encoder_factory=gate)

    class OpeningEvent(threading.Event):
        """The run's stop event (the only Event of :mod:`rqvae_ray.pipeline.executor`): set, it opens the gate."""

        def set(self) -> None:
            super().set()
            gate.open()

    class Threading:
        """The threading module as :mod:`rqvae_ray.pipeline.executor` sees it."""

        Event = OpeningEvent

        def __getattr__(self, name: str):
            return getattr(threading, name)

    app.make_options = gated_options
    executor.threading = Threading()
    sys.argv = [sys.argv[0], *args]
    app.main()


if __name__ == "__main__":
    main()
