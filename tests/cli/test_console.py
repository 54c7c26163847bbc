"""The console: the run's own lines on the terminal and Ray's in the log file; progress as a live view or lines."""

from __future__ import annotations

import io
import os

from rqvae_ray.cli.console import LiveProgress, RunConsole, make_progress
from rqvae_ray.pipeline.progress import Progress, Quiet


def test_descriptors_1_and_2_go_to_the_log_and_our_lines_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "logs" / "run.log"
    console = RunConsole(log)
    with console.captured():
        os.write(1, b"ray says hello on fd 1\n")
        os.write(2, b"[core_worker.cc] ray says hello on fd 2\n")
        # A logger's stream on descriptor 2, as sys.stderr is in a real process (pytest replaces sys.stderr).
        with os.fdopen(2, "w", closefd=False) as stream:
            print("a python logger of ray", file=stream, flush=True)
        console.echo("our line")
        console.error("our error")
    seen = capfd.readouterr()
    assert seen.out == "our line\n" and seen.err == "error: our error\n"
    text = log.read_text()
    for line in ("ray says hello on fd 1", "ray says hello on fd 2", "a python logger of ray"):
        assert line in text
    assert "our line" not in text
    os.write(1, b"after\n")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


def test_without_a_log_nothing_is_redirected(capfd):
    console = RunConsole(None)
    with console.captured():
        os.write(2, b"shown\n")
        console.echo("ours")
    seen = capfd.readouterr()
    assert seen.err == "shown\n" and seen.out == "ours\n"


def test_progress_kinds(tmp_path):
    console = RunConsole(None)
    assert isinstance(make_progress(console, quiet=True), Quiet)
    console.out = io.StringIO()  # not a terminal: plain lines
    plain = make_progress(console, quiet=False)
    assert type(plain) is Progress
    plain.note("a note")
    plain.dataset_finished("org/nyc", 10, 2)
    assert console.out.getvalue() == "a note\norg/nyc: 10 POIs written for 2 models\n"


def test_live_view_draws_a_bar_per_dataset():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    live = LiveProgress(stream)
    live.note("comp5331poi/nyc: 5135 POIs x 1407 features")
    live.dataset_started("comp5331poi/nyc", 5135, 5)
    live.dataset_started("comp5331poi/tky", 7900, 5)
    live.rows_written("comp5331poi/nyc", 4096, 5135, 5)
    live.dataset_finished("comp5331poi/nyc", 5135, 5)
    live.dataset_finished("comp5331poi/tky", 7900, 5)
    live.stop()
    text = stream.getvalue()
    assert "comp5331poi/nyc: 5135 POIs x 1407 features" in text
    assert "5135/5135" in text and "7900/7900" in text and "SIDs/s" in text


def test_rates_are_compact():
    from rqvae_ray.cli.console import _compact

    values = (950.4, 12_345, 4_100_000, 466_137_207, 7e12)
    assert [_compact(v) for v in values] == ["950", "12.3k", "4.1M", "466M", "7000G"]
