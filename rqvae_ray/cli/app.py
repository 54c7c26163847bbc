"""The command line: ``python -m rqvae_ray.run`` / ``rqvae-ray``."""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer

from rqvae_ray.cli.console import LOG_DIR, LiveProgress, RunConsole, make_progress, new_log_path
from rqvae_ray.cli.flags import HelpFlag, flag
from rqvae_ray.cli.summary import table_text, write_summary_json
from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.core.presets import presets_help, variable_length_warning
from rqvae_ray.errors import RayConnectionLost, RayStartError, RqvaeRayError, StopSignal, error_chain, reason_of
from rqvae_ray.inputs.decoded_cache import CACHE_BYTES
from rqvae_ray.inputs.decoded_cache import DEFAULT_DIR as INPUT_CACHE_DIR
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, ModelSpec, read_models_file, split_model_ids
from rqvae_ray.pipeline.executor import LOCAL_MAX_SID_ROWS
from rqvae_ray.pipeline.options import ExecutorMode, PoolMode, RunOptions, check_setup, make_options
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.pipeline.results import ModelResult
from rqvae_ray.runner import SHUTDOWN_WAIT_S, begin_shutdown, end_process_now, run_models

DEMO_HUB = Path("demo_hub")
DEMO_OUT = Path("demo_out")
# Positionals that are values, not model IDs: what `--force true` leaves behind.
FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}
# Signals that stop a run as Ctrl-C (SIGINT) does (``ray job stop`` sends SIGTERM); it exits with 128 + the number.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# The stop signals this process got (set by their handler).
_received: list[int] = []
# Set by main(): the process ends once the command returns, so a run's end may begin stopping Ray before its report
# (a command invoked otherwise, as tests do, leaves the process and its Ray as they are).
_process_ends = threading.Event()

app = typer.Typer(add_completion=False, help="Turn POI features into semantic IDs with RQ-VAE models on Ray.")


@app.command(add_help_option=False)
def run(
    model_ids: Annotated[
        list[str] | None,
        typer.Argument(
            help="Model IDs (org/name), each optionally paired with its dataset repo as MODEL_ID=ORG/DATASET "
            "(needed when the name does not follow the published rqvae-<dataset>-... scheme); default: the 10 "
            "published models."
        ),
    ] = None,
    models_file: Annotated[
        Path | None,
        typer.Option(help="Read more MODEL_ID[=ORG/DATASET] entries from this file, one per line (# comments)."),
    ] = None,
    hub_dir: Annotated[
        Path | None, typer.Option(help="Read models and datasets from this local hub directory (default: the Hub).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="Write outputs under this directory (default: upload to the Hub).")
    ] = None,
    upload: Annotated[bool, flag("--upload", "Upload to the Hub even when --out-dir is given.")] = False,
    dataset: Annotated[
        str | None, typer.Option(help="Only run the models of this dataset (a name such as nyc, or ORG/DATASET).")
    ] = None,
    demo: Annotated[bool, flag("--demo", f"Build ./{DEMO_HUB} if missing and write to ./{DEMO_OUT}.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag, commit) of the model repos.")] = None,
    dataset_revision: Annotated[str | None, typer.Option(help="Hub revision of the dataset repos.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
    executor: Annotated[
        ExecutorMode,
        typer.Option(
            help="Where the work runs: 'local' in this process (its threads), 'ray' on Ray Data's actor pools (a "
            "private local Ray, or the cluster of --address / RAY_ADDRESS), 'auto' on Ray when a cluster is given, "
            f"GPUs are asked for or the job has over {LOCAL_MAX_SID_ROWS:,} SID rows (POIs to encode x models; "
            "measured: this process is faster up to there on 2 cores, and its serial part caps it at 3-4x one core "
            "however many there are), in this process otherwise. Outputs are byte-identical either way."
        ),
    ] = ExecutorMode.AUTO,
    pools: Annotated[
        PoolMode,
        typer.Option(
            help="Actor pools: 'dataset' packs all models of a dataset into each actor (the batch is decoded once), "
            "'model' gives each model its own pool (for models too large to share an actor or a GPU, or pools "
            "sized apart), 'auto' packs unless the models' weights together exceed 2 GiB. Outputs are "
            "byte-identical either way."
        ),
    ] = PoolMode.AUTO,
    batch_size: Annotated[int, typer.Option(min=1, help="POIs per batch.")] = 4096,
    actors_per_pool: Annotated[
        int | None,
        typer.Option(
            "--actors-per-pool", "--actors-per-model", min=1, help="Fixed number of actors per pool (default: auto)."
        ),
    ] = None,
    min_actors: Annotated[int | None, typer.Option(min=1, help="Autoscaling pool: fewest actors per pool.")] = None,
    max_actors: Annotated[int | None, typer.Option(min=1, help="Autoscaling pool: most actors per pool.")] = None,
    cpus_per_actor: Annotated[float | None, typer.Option(min=0.0, help="CPUs reserved per encoder actor.")] = None,
    gpus_per_actor: Annotated[
        float | None,
        typer.Option(
            "--gpus-per-actor",
            "--gpus-per-model",
            min=0.0,
            help="GPUs per encoder actor, fractional allowed (default: share the cluster's GPUs).",
        ),
    ] = None,
    base_folder: Annotated[str, typer.Option(help="Output folder inside the dataset repo.")] = "LLM Dataset",
    output_format: Annotated[OutputFormat, typer.Option("--format", help="Output file format.")] = OutputFormat.CSV,
    force: Annotated[bool, flag("--force", "Redo outputs that are already up to date.")] = False,
    dedup: Annotated[
        bool, flag("--dedup", "Give POIs that share an SID one extra code 0, 1, 2, ... in Pid order.")
    ] = False,
    fixed_length: Annotated[
        bool, flag("--fixed-length", "With --dedup: give every POI the extra code (0 for a unique SID).")
    ] = False,
    sid_tokens: Annotated[
        bool, flag("--sid-tokens", "Add an SID column with the <a_x><b_y><c_z>[<d_w>] LLM tokens.")
    ] = False,
    export: Annotated[
        str | None,
        typer.Option(
            "--export",
            metavar="index-json,tensor",
            help="Also write codebooks-<model>.index.json (Pid to SID tokens) and/or .sids.pt (an int64 tensor, "
            "levels x POIs); with --dedup or any export, .prefixes.json (codes allowed after each SID prefix) too.",
        ),
    ] = None,
    for_: Annotated[
        str | None,
        typer.Option(
            "--for",
            metavar="NAME[,NAME...]",
            help="Write what these trainers' own loaders read, beside each codebooks file (dedup on; a code on every "
            "POI where one decodes a fixed number of codes); an option that contradicts one is refused. "
            + presets_help(),
        ),
    ] = None,
    keep_existing: Annotated[
        bool,
        flag(
            "--keep-existing",
            "Keep every POI of the published codebooks file with its codes; encode only the POIs added after it.",
        ),
    ] = False,
    max_per_sid: Annotated[
        int | None,
        typer.Option(
            "--max-per-sid",
            metavar="K",
            help="At most K POIs keep one SID: in a fuller SID those farthest from their last codeword (then the "
            "higher Pids) move, nearest first, to the nearest last-level codeword under the same prefix whose SID "
            "has room (a level up when none has); decided once every SID is counted, before --dedup; POIs kept by "
            "--keep-existing stay. A model with more POIs than K x its possible SIDs fails before any work. The "
            "table and the quality report give the POIs moved and their extra squared distance.",
        ),
    ] = None,
    actor_wait_s: Annotated[
        float, typer.Option(help="Fail if the cluster cannot hold a dataset's encoder actors within this many seconds.")
    ] = 600.0,
    upload_retries: Annotated[int, typer.Option(min=0, help="Retries of a failed upload commit.")] = 5,
    retry_backoff_s: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to wait before retrying a Hub call that failed transiently (429, 5xx, a dropped "
            "connection), doubled at each retry; a longer Retry-After from the server is waited for instead.",
        ),
    ] = 1.0,
    no_input_cache: Annotated[
        bool,
        flag(
            "--no-input-cache",
            f"Decode every .pt checkpoint and feature file with torch this run; by default what they decode to is "
            f"kept in {INPUT_CACHE_DIR} (by each file's sha256; at most {CACHE_BYTES >> 30} GiB, least recently used "
            "removed first), and a later run on the same files reads it there without importing torch.",
        ),
    ] = False,
    report_dir: Annotated[
        Path | None, typer.Option(help="Write sid_quality.json/.png here (default: --out-dir; none if uploading only).")
    ] = None,
    quiet: Annotated[bool, flag("--quiet", "Print only the final table and errors.")] = False,
    summary_json: Annotated[
        Path | None, typer.Option(help="Also write the final table, quality figures and exit reason as JSON here.")
    ] = None,
    log_file: Annotated[
        Path | None,
        typer.Option(
            help=f"Where the run's log goes: Ray's and the libraries' own output (default: a new file in {LOG_DIR}); "
            "the summary names it."
        ),
    ] = None,
    debug: Annotated[bool, flag("--debug", "Show Ray's output on the console, and tracebacks.")] = False,
    _help: HelpFlag = False,
) -> None:
    """Encode every POI of each model's dataset and write one codebooks file per model."""
    console = RunConsole(None if debug else (log_file or new_log_path()))
    with console.captured():
        selected = _select(console, model_ids, models_file, dataset)
        if isinstance(selected, _Outcome):
            _finish(console, selected, summary_json)
        specs, invalid = selected
        progress = make_progress(console, quiet)
        if demo:
            hub_dir, out_dir = hub_dir or DEMO_HUB, out_dir or DEMO_OUT
        try:
            if demo and not hub_dir.exists():
                from rqvae_ray.inputs.demo import build_demo_hub

                progress.note(f"building the demo hub in {hub_dir} ...")
                build_demo_hub(hub_dir, progress=progress.note)
            options = make_options(
                hub_dir=hub_dir,
                revision=revision,
                dataset_revision=dataset_revision,
                out_dir=out_dir,
                upload=upload or None,
                base_folder=base_folder,
                fmt=output_format,
                dedup=dedup,
                fixed_length=fixed_length,
                sid_tokens=sid_tokens,
                exports=export or "",
                for_=for_ or "",
                keep_existing=keep_existing,
                max_per_sid=max_per_sid,
                force=force,
                executor=executor,
                pools=pools,
                actors_per_pool=actors_per_pool,
                min_actors=min_actors,
                max_actors=max_actors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                batch_size=batch_size,
                actor_wait_s=actor_wait_s,
                address=address,
                upload_retries=upload_retries,
                retry_backoff_s=retry_backoff_s,
                input_cache=None if no_input_cache else INPUT_CACHE_DIR,
            )
            exported = frozenset(e.value for e in options.output.exports)
            if warning := variable_length_warning(exported, options.output.fixed_length):
                console.warn(warning)
            check_setup(options)
        except RqvaeRayError as exc:
            console.error(str(exc))
            _finish(console, _Outcome(2, "setup error", invalid), summary_json)
        reports_to = report_dir or out_dir
        outcome = _execute(console, specs, invalid, options, progress, debug, summary_json)
        if _process_ends.is_set():
            _begin_stopping()  # Ray stops while the report is drawn
        _report(console, outcome.results, reports_to)
        if console.log_path is not None:
            console.echo(f"Log of this run (Ray's and the libraries' own output): {console.log_path}")
        failed = [r for r in outcome.results if not r.ok]
        console.echo(f"\n{len(outcome.results) - len(failed)} of {len(outcome.results)} models succeeded")
        _finish(console, outcome, summary_json)


@dataclass(frozen=True)
class _Outcome:
    """How a run ended: its exit status, the reason, and a result per model."""

    code: int
    reason: str
    results: list[ModelResult] = field(default_factory=list)


def _finish(console: RunConsole, outcome: _Outcome, summary_json: Path | None) -> NoReturn:
    """Write ``--summary-json`` and exit with the outcome's status (1 for a run that succeeded but whose summary
    JSON, which a caller reads to learn the outcome, cannot be written)."""
    code = outcome.code
    if summary_json is not None:
        log = str(console.log_path or "")
        try:
            write_summary_json(summary_json, outcome.results, outcome.code, outcome.reason, log)
        except OSError as exc:
            console.error(
                f"the summary JSON was not written to {summary_json} ({exc.strerror or exc}); give --summary-json a "
                "path in a writable folder"
            )
            code = code or 1
    raise typer.Exit(code)


def _select(
    console: RunConsole, model_ids: list[str] | None, models_file: Path | None, dataset: str | None
) -> tuple[list[ModelSpec], list[ModelResult]] | _Outcome:
    """The models to run and a failed result per invalid model ID, or the outcome when nothing can run."""
    values = [m for m in model_ids or [] if m.strip().lower() in FLAG_VALUES]
    if values:
        console.error(f"{values[0]!r} is not a model ID: flags take no value (write --force, not --force {values[0]})")
        return _Outcome(2, "invalid arguments")
    requested = list(model_ids or [])
    if models_file is not None:
        try:
            requested += read_models_file(models_file)
        except RqvaeRayError as exc:
            console.error(str(exc))
            return _Outcome(2, "unreadable models file")
    specs, bad_ids, duplicates = split_model_ids(requested or list(DEFAULT_MODELS))
    invalid = [ModelResult(m, "", ok=False, error=f"invalid model ID {why}") for m, why in bad_ids.items()]
    for result in invalid:
        console.error(result.error)
    for model_id, count in duplicates.items():
        console.echo(f"note: {model_id} was given {count} times; running it once")
    if dataset is not None:
        specs = [s for s in specs if dataset in (s.dataset, s.dataset_repo)]
        if not specs and not invalid:
            console.error(f"no requested model is a {dataset} model")
            return _Outcome(2, "no model to run")
    if not specs:
        return _Outcome(2, "invalid model IDs", invalid)
    return specs, invalid


def _execute(
    console: RunConsole,
    specs: list[ModelSpec],
    invalid: list[ModelResult],
    options: RunOptions,
    progress: Progress,
    debug: bool,
    summary_json: Path | None,
) -> _Outcome:
    """Run the models, then print the errors and the summary table; a run stopped by a signal or by the loss of its
    Ray cluster ends the process here (see :func:`_exit_now`)."""
    try:
        try:
            results = run_models(specs, options, progress)
        finally:
            if isinstance(progress, LiveProgress):
                progress.stop()
    except RayConnectionLost as exc:
        _exit_now(console, str(exc), _Outcome(1, "lost the connection to the Ray cluster", invalid), summary_json)
    except BaseException as exc:
        signum = _stop_signal_in(exc)
        if signum is not None:
            if isinstance(exc, Exception):  # raised while the run was stopping: said in the log, not on the terminal
                console.log_traceback(exc)
            name = signal.Signals(signum).name
            outcome = _Outcome(128 + signum, f"stopped by {name}", invalid)
            _exit_now(console, _stopped_line(signum), outcome, summary_json)
        if debug or not isinstance(exc, Exception):
            raise
        console.log_traceback(exc)
        console.error(f"{reason_of(exc)} (--debug for details; the run's log is {console.log_path})")
        if isinstance(exc, RayStartError):  # no model ran: each is counted, and listed in --summary-json, as failed
            failed = [ModelResult(s.model_id, s.dataset_repo, ok=False, error=str(exc)) for s in specs]
            return _Outcome(1, "Ray did not start", failed + invalid)
        return _Outcome(1, "internal error", invalid)
    for result in results:
        if not result.ok:
            console.error(f"{result.model_id}: {result.error}")
    results += invalid
    console.echo("")
    console.echo(table_text(results))
    failed = [r for r in results if not r.ok]
    return _Outcome(1, f"{len(failed)} model(s) failed", results) if failed else _Outcome(0, "ok", results)


def _stop_signal(exc: KeyboardInterrupt | SystemExit) -> int | None:
    """The signal that stopped the run with ``exc``; None when ``exc`` is an exit of another kind."""
    if isinstance(exc, StopSignal):
        return exc.signum
    if isinstance(exc, KeyboardInterrupt):
        return signal.SIGINT
    # ray.init replaces this process's SIGTERM handler with one of its own that calls sys.exit(SIGTERM).
    return signal.SIGTERM if exc.code == signal.SIGTERM else None


def _stop_signal_in(exc: BaseException) -> int | None:
    """The signal that stopped the run, when ``exc`` is that stop or was raised while the run was stopping (a stop
    along its causes and contexts); None otherwise."""
    for error in error_chain(exc):
        if isinstance(error, (KeyboardInterrupt, SystemExit)) and (signum := _stop_signal(error)) is not None:
            return signum
    return None


def _stopped_line(signum: int) -> str:
    """The one line a run stopped by ``signum`` prints."""
    why = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    return f"{why}; finished outputs are kept, unfinished ones were not published"


def _exit_now(console: RunConsole, line: str, outcome: _Outcome, summary_json: Path | None) -> NoReturn:
    """End a run stopped early: print ``line``, write ``--summary-json`` and exit at once, as nothing is left to wait
    for, without leaving Ray first (the dataset threads may still be inside Ray calls): a private Ray's processes are
    killed once the process has ended (see :func:`rqvae_ray.runner.end_process_now`)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)  # the run is stopping already
    console.error(line)
    try:
        _finish(console, outcome, summary_json)
    except typer.Exit:
        pass  # _finish ends the command through typer; this process ends here instead
    for stream in (console.out, console.err, sys.stdout, sys.stderr):
        stream.flush()
    end_process_now(outcome.code)


@functools.cache
def _begin_stopping() -> threading.Event:
    """Once the run is over (its outputs published or given up), begin stopping what it started (Ray, when it ran
    on it) in the background; the event is set when done.

    Nothing the run left is ever collected from here on: a Ray object freed once the driver has left Ray makes Ray's
    core worker end the process with status 1 (seen in one job run of ~30, from a collection while the quality
    report was drawn). Frozen, the run's objects are out of every later collection (Ray's own ``gc.collect`` calls
    included) and the process ends with ``os._exit``, so none of their destructors runs; freezing also spares the
    0.1-0.15 s that a last full collection took.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    gc.disable()
    gc.freeze()
    return begin_shutdown()


def _stop_ray_and_exit(code: int) -> NoReturn:
    """Stop what this process's runs started (see :func:`_begin_stopping`), then end the process at once."""
    _begin_stopping().wait(SHUTDOWN_WAIT_S)
    os._exit(code)


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    """The handler of the stop signals: stop the run from the main thread as Ctrl-C does; later ones are ignored."""
    for other in STOP_SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    _received.append(signum)
    raise StopSignal(signum)


def _install_stop_handlers() -> None:
    """Stop the run on each of :data:`STOP_SIGNALS`, except those ignored when the command started: a signal ignored
    then stays ignored, as Python leaves Ctrl-C under ``nohup`` or in a background job, so that a run started with
    ``nohup`` outlives its terminal's hang-up (SIGHUP)."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _raise_stop)


def _report(console: RunConsole, results: list[ModelResult], folder: Path | None) -> None:
    """Print the SID quality table and write the run's JSON + PNG report (a report failure is only a warning)."""
    from rqvae_ray.cli.report import quality_table, write_quality_report

    reports = {r.model_id: r.quality for r in results if r.ok and r.quality}
    if not reports:
        return
    console.echo("\nSID quality\n" + quality_table(reports))
    if folder is None:
        return
    try:
        written = write_quality_report(folder, reports)  # with the other models already reported in this folder
    except RqvaeRayError as exc:
        console.warn(f"the quality report was not written ({exc})")
        return
    console.echo(f"quality report: {written.json_path} and {written.png_path} ({len(written.models)} models)")


def main() -> NoReturn:
    """Console-script entry point (also ``python -m rqvae_ray.run``).

    Once the models' files are published, Ray (when the run started or joined it) shuts down while the quality report
    is drawn; the process then ends at once, because the interpreter's own teardown of torch, Ray and Arrow takes
    seconds and does nothing for the user.
    SIGTERM and SIGHUP stop a run as Ctrl-C does, with status 128 + the signal's number, unless the command started
    with them ignored (see :func:`_install_stop_handlers`). A crash in native code (Ray's
    core worker, Arrow, torch) first writes every thread's Python stack to standard error (the run's log while the
    run's output goes there), so that a rare crash says where it happened.
    """
    # Standard error closed or without a file descriptor: there is nowhere to write the stacks.
    with contextlib.suppress(RuntimeError, ValueError, OSError, AttributeError):
        faulthandler.enable(all_threads=True)
    _install_stop_handlers()
    _process_ends.set()
    try:
        app(prog_name="rqvae-ray")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if _received:  # stopped outside the models' work, which exits by itself; typer ends any interrupt with 130
        print(f"error: {_stopped_line(_received[0])}", file=sys.stderr)
        code = 128 + _received[0]
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    _stop_ray_and_exit(code)


if __name__ == "__main__":
    sys.exit(main())
