"""``python -m tests.gated_cli FOLDER INPUT_DIM ARGS...``: the command line (``python -m rqvae_ray.run ARGS...``)
with :class:`tests.gate.Gate` as its encoder factory, so that a test holds the models of ``INPUT_DIM`` features at the
gate in ``FOLDER``. Everything else is the command line's own: its options, signal handling and exit status.

Once the run is stopping (a signal, or a lost cluster: it reports :meth:`~rqvae_ray.pipeline.progress.Progress.stopping`
once it has told every dataset to stop at its next block), the gate opens, so that a held dataset stops at its next
block as an ungated run does, rather than staying stuck at the gate (which the run only gives up on after a while).
The stop is already decided when the gate opens: every dataset stops at the first block it is let through, so none is
finished by the rows let through.

The run starts with the signals of a terminal's foreground job, whatever started the suite: SIGINT with Python's own
handler (KeyboardInterrupt), SIGTERM and SIGHUP at their defaults. A background job of a non-interactive shell inherits
SIGINT ignored and ``nohup`` SIGHUP, which the command then leaves ignored, so that a test's signal would do nothing
(seen: both SIGINT tests waited out their 120 s). ``GATED_CLI_IGNORED_SIGNALS`` (names, comma-separated, say
``SIGHUP`` as ``nohup`` does) starts it with those ignored instead.

With ``GATED_CLI_CANCEL_WAIT_S`` set, the stopping run waits that long (instead of
:data:`~rqvae_ray.pipeline.executor.CANCEL_WAIT_S`) for its datasets to stop before it gives up on them: 0 makes it
give up on every dataset at once, whose threads are then still inside the executor's calls.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

from rqvae_ray.cli import app
from rqvae_ray.pipeline import executor
from tests.gate import Gate


def main() -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    for name in filter(None, os.environ.get("GATED_CLI_IGNORED_SIGNALS", "").split(",")):
        signal.signal(signal.Signals[name], signal.SIG_IGN)
    folder, input_dim, *args = sys.argv[1:]
    gate = Gate(folder, int(input_dim))
    if (wait_s := os.environ.get("GATED_CLI_CANCEL_WAIT_S")) is not None:
        executor.CANCEL_WAIT_S = float(wait_s)
    make_options, make_progress = app.make_options, app.make_progress

    def gated_options(**kwargs):
        return dataclasses.replace(make_options(**kwargs), encoder_factory=gate)

    def gated_progress(*args, **kwargs):
        progress = make_progress(*args, **kwargs)
        progress.stopping = gate.open
        return progress

    app.make_options, app.make_progress = gated_options, gated_progress
    sys.argv = [sys.argv[0], *args]
    app.main()


if __name__ == "__main__":
    main()
