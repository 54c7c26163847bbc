"""``python -m benchmarks w1`` / ``w2 --pois N``: ours (the rqvae_ray CLI) against a baseline; ``ceiling``: ours with an
encoder that does no math against the disk.

Every system runs as a fresh subprocess (interpreter start, imports and, for ours, Ray start-up included), measured
by :mod:`benchmarks.measure`: wall time, and the peak of the memory summed over the whole process tree (for ours every
Ray process: gcs_server, raylet, workers, agents). Each workload ends with a table, the goals, and a code check
(ours against the baseline, row by row).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.compare import CodeComparison, compare_files, output_file
from benchmarks.measure import Measurement, bench_env, run_measured

REPO = Path(__file__).resolve().parents[1]
# The measured runs' cache folder (XDG_CACHE_HOME): their logs, and the decoded inputs ours keeps between runs.
BENCH_CACHE = REPO / ".bench" / "cache"
GIB = 1 << 30
# W1 goals: the default command line against the original replay; ours on Ray against the floor of Ray Data.
W1_REPLAY_GOAL = 0.5
W1_RAY_FLOOR_GOAL = 1.2
# W2 goals: ours/baseline wall time at most this per output format, peak PSS of all processes, its growth with N.
W2_WALL_GOALS = {"csv": 0.6, "parquet": 0.67}
W2_MEMORY_GOAL = 2 * GIB
# Ours at most this many times this machine's floor for the job (see :class:`JobFloor`), whose Ray Data part is the
# median of this many runs of benchmarks.floor.
W2_JOB_FLOOR_GOAL = 1.15
FLOOR_RUNS = 3
FLAT_TOLERANCE = 1.05
CODE_GOAL = 0.999
# The ceiling: streaming SID rows at most this many times the disk's time for the same bytes.
CEILING_DISK_GOAL = 1.5

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0], no_args_is_help=True)


@dataclass
class SystemResult:
    """All runs of one system on one workload configuration."""

    workload: str
    system: str
    pois: int
    models: int
    sid_rows: int  # POIs x models, summed over datasets
    runs: list[Measurement] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def min_wall_s(self) -> float:
        """The fastest run: on a shared machine others' work only ever adds time, so the minimum is the least noisy."""
        return min(r.wall_s for r in self.runs)

    @property
    def rows_per_s(self) -> float:
        return self.sid_rows / self.wall_s if self.wall_s else 0.0

    @property
    def peak_rss(self) -> int:
        return max(r.peak_rss for r in self.runs)

    @property
    def peak_pss(self) -> int | None:
        values = [r.peak_pss for r in self.runs if r.peak_pss is not None]
        return max(values) if values else None

    @property
    def peak_processes(self) -> int:
        return max(r.peak_processes for r in self.runs)

    def summary(self) -> dict:
        return {
            "workload": self.workload,
            "system": self.system,
            "pois": self.pois,
            "models": self.models,
            "sid_rows": self.sid_rows,
            "ok": self.ok,
            "wall_s_median": self.wall_s,
            "wall_s_min": self.min_wall_s,
            "wall_s_runs": [r.wall_s for r in self.runs],
            "sid_rows_per_s": self.rows_per_s,
            "peak_rss_bytes": self.peak_rss,
            "peak_pss_bytes": self.peak_pss,
            "peak_processes": self.peak_processes,
            "returncodes": [r.returncode for r in self.runs],
            "load_before": [r.load_before for r in self.runs],
            "load_after": [r.load_after for r in self.runs],
        }


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages * size / GIB:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} CPUs ({cpu}){memory}, {system}, Python {sys.version.split()[0]}"


def product_version() -> str:
    """The product's git commit, and whether rqvae_ray/ has uncommitted changes (the figures measure the worktree)."""
    import subprocess

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rqvae_ray"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line for line in dirty if line.strip()]
    return f"commit {commit}" + (f" + {len(changed)} uncommitted file(s) in rqvae_ray/" if changed else "")


def print_table(groups: list[tuple[SystemResult, list[SystemResult]]]) -> None:
    """Per workload configuration, ours and then each system it is compared with; a compared system's row carries
    ours/that system ratios measured in the same run."""
    header = (
        "workload",
        "system",
        "POIs",
        "models",
        "runs",
        "wall s (median)",
        "wall s (min)",
        "SID rows/s",
        "peak RSS GiB",
        "peak PSS GiB",
        "procs",
        "ours/this wall (median)",
        "ours/this RSS",
        "ours/this PSS",
        "status",
    )
    rows = []
    for ours, others in groups:
        for result in (ours, *others):
            compared = result is not ours and bool(result.runs) and bool(ours.runs)
            rows.append(
                (
                    result.workload,
                    result.system,
                    f"{result.pois:,}",
                    str(result.models),
                    str(len(result.runs)),
                    f"{result.wall_s:.2f}" if result.runs else "-",
                    f"{result.min_wall_s:.2f}" if result.runs else "-",
                    f"{result.rows_per_s:,.0f}" if result.runs else "-",
                    _gib(result.peak_rss) if result.runs else "-",
                    _gib(result.peak_pss) if result.runs else "-",
                    str(result.peak_processes) if result.runs else "-",
                    _ratio(ours.wall_s, result.wall_s) if compared else "",
                    _ratio(ours.peak_rss, result.peak_rss) if compared else "",
                    _ratio(ours.peak_pss, result.peak_pss) if compared else "",
                    "ok" if result.ok else ("not run" if not result.runs else "FAILED"),
                )
            )
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    for row in (header, *rows):
        typer.echo("  ".join(cell.rjust(widths[i]) if i >= 2 else cell.ljust(widths[i]) for i, cell in enumerate(row)))


def _load_note(measurement: Measurement) -> str:
    if measurement.load_before is None:
        return "load average unknown"
    return f"load avg {measurement.load_before:.1f} -> {measurement.load_after:.1f}"


def _python() -> str:
    return sys.executable


def _run_system(
    result: SystemResult, label: str, command: list[str], log: Path, verbose: bool, decoded_before: bool = False
) -> None:
    """One measured run of one system: announce it, measure it, record it on ``result`` and print its figures."""
    typer.echo(f"  {label}: {result.system} ...")
    measurement = _measure(command, log, verbose, decoded_before)
    result.runs.append(measurement)
    typer.echo(
        f"    {measurement.wall_s:.2f}s ({result.sid_rows / measurement.wall_s:,.0f} SID rows/s), "
        f"peak RSS {_gib(measurement.peak_rss)} GiB, PSS {_gib(measurement.peak_pss)} GiB, "
        f"exit {measurement.returncode}, {_load_note(measurement)}"
    )


def _measure(command: list[str], log: Path, verbose: bool, decoded_before: bool = False) -> Measurement:
    """One measured run. Ours keeps decoded ``.pt`` inputs between runs (``--no-input-cache``); every run finds none
    (a first run on its inputs, as before that cache) unless ``decoded_before``, when it finds what the run before
    left."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if not decoded_before:
        shutil.rmtree(BENCH_CACHE / "rqvae_ray" / "inputs", ignore_errors=True)
    # Untimed: what earlier runs wrote through the page cache is on the disk before this run starts, so that the
    # kernel's write-back of one system's files (the baseline's GBs of CSV) is not charged to the next.
    os.sync()
    env = bench_env({"XDG_CACHE_HOME": str(BENCH_CACHE)})
    measurement = run_measured(command, env=env, cwd=REPO, echo=typer.echo if verbose else None)
    with log.open("w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        for at, line in measurement.lines:
            handle.write(f"[{at:8.3f}s] {line}\n")
        handle.write(
            f"# exit {measurement.returncode}, wall {measurement.wall_s:.3f}s, peak RSS {measurement.peak_rss} B, "
            f"peak PSS {measurement.peak_pss} B, peak processes {measurement.peak_processes}, "
            f"1-min load average {measurement.load_before} before, {measurement.load_after} after\n"
        )
        handle.write("# processes at the RSS peak (RSS MiB):\n")
        for label, size in measurement.peak_breakdown:
            handle.write(f"#   {size / (1 << 20):8.1f}  {label}\n")
        for role, seconds in sorted(measurement.cpu_by_role.items()):
            handle.write(f"# CPU {seconds:8.2f} s  {role}: {' | '.join(measurement.titles_by_role.get(role, []))}\n")
    if measurement.returncode != 0:
        typer.echo(f"  FAILED (exit {measurement.returncode}); log {log}; last lines:", err=True)
        typer.echo(measurement.tail(15), err=True)
    return measurement


def _report_codes(comparisons: list[CodeComparison]) -> bool:
    total = sum(c.rows for c in comparisons)
    equal = sum(c.equal_rows for c in comparisons)
    typer.echo("")
    typer.echo("codes, ours vs baseline (rows with identical [c1, c2, c3]):")
    for c in comparisons:
        pid_note = "" if c.pids_equal else "  (Pid columns differ!)"
        typer.echo(f"  {c.model_id}: {c.equal_rows}/{c.rows} equal, {c.differing} differ{pid_note}")
    fraction = equal / total if total else 0.0
    good = total > 0 and fraction >= CODE_GOAL and all(c.pids_equal for c in comparisons)
    typer.echo(
        f"  all models: {equal}/{total} equal ({100 * fraction:.4f}%), {total - equal} differ -> "
        f"{'PASS' if good else 'FAIL'} (goal >= {100 * CODE_GOAL:.1f}%)"
    )
    return good


def _save(results_dir: Path, name: str, payload: dict) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def prepare_bench_dir(bench_dir: Path) -> Path:
    """Create the working directory with a ``.gitignore`` of ``*``, so that nothing in it is ever committed."""
    bench_dir = bench_dir.resolve()
    bench_dir.mkdir(parents=True, exist_ok=True)
    ignore = bench_dir / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark hubs, outputs and results (python -m benchmarks); never commit\n*\n")
    return bench_dir


def _goal(label: str, passed: bool, detail: str) -> None:
    typer.echo(f"  [{'PASS' if passed else 'FAIL'}] {label}: {detail}")


@dataclass
class JobFloor:
    """This machine's floor for a job of ``sid_rows`` SID rows: the encoder's CPU seconds for every row divided by
    the cores (its rate measured right before each of ours' runs, the median), plus the floor of Ray Data
    (:mod:`benchmarks.floor`, the median of its runs), measured in one sitting."""

    sid_rows: int
    cpu_s_per_sid_row: float | None
    cores: int
    ray_data: SystemResult
    rates: tuple[float | None, ...] = ()  # each measurement of the encoder's rate, in order

    @property
    def ok(self) -> bool:
        return self.cpu_s_per_sid_row is not None and self.ray_data.ok

    @property
    def encode_s(self) -> float:
        return self.sid_rows * self.cpu_s_per_sid_row / self.cores

    @property
    def wall_s(self) -> float:
        return self.encode_s + self.ray_data.wall_s

    def describe(self) -> str:
        return (
            f"{self.wall_s:.1f}s = {self.sid_rows:,} SID rows x {1e6 * self.cpu_s_per_sid_row:.2f} us / "
            f"{self.cores} cores + Ray Data's floor {self.ray_data.wall_s:.1f}s"
        )

    def summary(self) -> dict:
        if not self.ok:
            return {"ok": False}
        return {
            "wall_s": self.wall_s,
            "encode_s": self.encode_s,
            "cpu_s_per_sid_row": self.cpu_s_per_sid_row,
            "cpu_s_per_sid_row_measured": list(self.rates),
            "cores": self.cores,
            "ray_data_floor": self.ray_data.summary(),
        }


def _encoder_rate(hub: Path, log: Path, verbose: bool) -> float | None:
    """The encoder's CPU seconds per SID row of ``hub``'s models on one thread (:mod:`benchmarks.job_floor`), or None
    when that measurement failed."""
    rate = _measure([_python(), "-m", "benchmarks.job_floor", "--hub-dir", str(hub)], log, verbose)
    if rate.returncode != 0:
        return None
    answer = next(line for _, line in reversed(rate.lines) if line.startswith("{"))
    cpu_s_per_sid_row = json.loads(answer)["cpu_s_per_sid_row"]
    typer.echo(f"    the encoder: {1e6 * cpu_s_per_sid_row:.2f} us of CPU per SID row (one thread)")
    return cpu_s_per_sid_row


def _job_floor(sid_rows: int, rates: list[float | None], logs: Path, verbose: bool) -> JobFloor:
    """:class:`JobFloor` for ``sid_rows`` SID rows, over the cores this process may use (as many as the in-process
    executor's encode threads), from the encoder's ``rates`` measured right before each of ours' runs (their median:
    the machine's speed moves within a sitting, and a rate measured once, after every system, was measured in
    another spell than ours)."""
    from rqvae_ray.pipeline.local import local_threads

    typer.echo(f"  this machine's floor for {sid_rows:,} SID rows:")
    cpu_s_per_sid_row = statistics.median(rates) if rates and None not in rates else None
    ray_data = SystemResult("W2", "floor (smallest Ray Data run)", 0, 0, 0)
    for run in range(1, FLOOR_RUNS + 1):
        command = [_python(), "-m", "benchmarks.floor"]
        _run_system(ray_data, f"run {run}/{FLOOR_RUNS}", command, logs / f"floor-{run}.log", verbose)
    return JobFloor(sid_rows, cpu_s_per_sid_row, local_threads(), ray_data, tuple(rates))


BenchDir = Annotated[Path, typer.Option(help="Working directory for hubs, outputs, logs and results.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Echo each subprocess's output live.")]


@app.command()
def w1(
    repeat: Annotated[int, typer.Option(min=1, help="Runs per system; the table shows the median wall time.")] = 3,
    bench_dir: BenchDir = Path(".bench"),
    check: Annotated[bool, typer.Option(help="Compare the codes of both systems.")] = True,
    verbose: Verbose = False,
) -> None:
    """W1, the original system's scale: the 10 default models on the demo hub; six systems side by side: ours with
    the default command line (``--executor auto``) and ours on Ray (``--executor ray``), each as a first run on its
    inputs and again right after (the inputs decoded before), the floor of any Ray Data run on this machine, and the
    original algorithm's replay. The goals are on the first runs."""
    from rqvae_ray.inputs.demo import build_demo_hub
    from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id

    bench_dir = prepare_bench_dir(bench_dir)
    hub = bench_dir / "demo_hub"
    if not hub.is_dir():
        typer.echo(f"building the demo hub in {hub} ...")
        build_demo_hub(hub, progress=lambda _: None)
    specs = [parse_model_id(m) for m in DEFAULT_MODELS]
    meta = {
        repo: json.loads((hub / "datasets" / repo / "RQVAE Dataset/metadata.json").read_text())
        for repo in {s.dataset_repo for s in specs}
    }
    pois = sum(m["num_pois"] for m in meta.values())
    sid_rows = sum(meta[s.dataset_repo]["num_pois"] for s in specs)
    out_ours, out_ray, out_base = (
        bench_dir / "w1" / "ours",
        bench_dir / "w1" / "ours-ray",
        bench_dir / "w1" / "original",
    )
    ours = SystemResult("W1", "ours (default: --executor auto)", pois, len(DEFAULT_MODELS), sid_rows)
    ours_again = SystemResult("W1", "ours (default), inputs decoded before", pois, len(DEFAULT_MODELS), sid_rows)
    on_ray = SystemResult("W1", "ours on Ray (--executor ray)", pois, len(DEFAULT_MODELS), sid_rows)
    on_ray_again = SystemResult("W1", "ours on Ray, inputs decoded before", pois, len(DEFAULT_MODELS), sid_rows)
    floor = SystemResult("W1", "floor (smallest Ray Data run)", pois, 0, sid_rows)
    base = SystemResult("W1", "baseline (original replay)", pois, len(DEFAULT_MODELS), sid_rows)
    typer.echo(f"machine: {machine()}")
    typer.echo(f"product: {product_version()}")
    typer.echo(f"W1: {len(DEFAULT_MODELS)} models, {pois:,} POIs ({sid_rows:,} SID rows), {repeat} run(s) each")
    local = [_python(), "-m", "rqvae_ray.run", "--hub-dir", str(hub), "--out-dir", str(out_ours), "--force"]
    ray = [_python(), "-m", "rqvae_ray.run", "--hub-dir", str(hub), "--out-dir", str(out_ray), "--force"]
    ray += ["--executor", "ray"]
    for run in range(1, repeat + 1):
        # A run "decoded before" comes right after the same command, which left it the decoded inputs.
        for result, command, log, again in (
            (ours, local, bench_dir / "w1" / "logs" / f"ours-{run}.log", False),
            (ours_again, local, bench_dir / "w1" / "logs" / f"ours-again-{run}.log", True),
            (on_ray, ray, bench_dir / "w1" / "logs" / f"ours-ray-{run}.log", False),
            (on_ray_again, ray, bench_dir / "w1" / "logs" / f"ours-ray-again-{run}.log", True),
            (
                floor,
                [_python(), "-m", "benchmarks.floor", "--rows", str(pois)],
                bench_dir / "w1" / "logs" / f"floor-{run}.log",
                False,
            ),
            (
                base,
                [_python(), "-m", "benchmarks.original", "--hub-dir", str(hub), "--out-dir", str(out_base)],
                bench_dir / "w1" / "logs" / f"original-{run}.log",
                False,
            ),
        ):
            _run_system(result, f"run {run}/{repeat}", command, log, verbose, decoded_before=again)
    typer.echo("")
    print_table([(ours, [base]), (ours_again, [base]), (on_ray, [floor]), (on_ray_again, [floor])])
    typer.echo("")
    typer.echo("goals:")
    _goal(
        f"W1 ours (default) wall <= {W1_REPLAY_GOAL}x the original replay",
        ours.ok and base.ok and ours.wall_s <= W1_REPLAY_GOAL * base.wall_s,
        f"median {ours.wall_s:.2f}s vs {base.wall_s:.2f}s ({_ratio(ours.wall_s, base.wall_s)}x; "
        f"fastest runs {ours.min_wall_s:.2f}s vs {base.min_wall_s:.2f}s)",
    )
    _goal(
        f"W1 ours on Ray wall <= {W1_RAY_FLOOR_GOAL}x the floor of Ray Data",
        on_ray.ok and floor.ok and on_ray.wall_s <= W1_RAY_FLOOR_GOAL * floor.wall_s,
        f"median {on_ray.wall_s:.2f}s vs {floor.wall_s:.2f}s ({_ratio(on_ray.wall_s, floor.wall_s)}x; "
        f"fastest runs {on_ray.min_wall_s:.2f}s vs {floor.min_wall_s:.2f}s)",
    )
    for result, against in ((ours_again, base), (on_ray_again, floor)):
        if result.ok and against.ok:
            typer.echo(
                f"  (not a goal) {result.system}: median {result.wall_s:.2f}s vs {against.system} "
                f"{against.wall_s:.2f}s ({_ratio(result.wall_s, against.wall_s)}x)"
            )
    codes_ok = None
    comparisons = []
    if check and ours.ok and base.ok:
        comparisons = [compare_files(m, output_file(out_ours, m), output_file(out_base, m)) for m in DEFAULT_MODELS]
        codes_ok = _report_codes(comparisons)
        if on_ray.ok:
            same = all(
                output_file(out_ours, m).read_bytes() == output_file(out_ray, m).read_bytes() for m in DEFAULT_MODELS
            )
            typer.echo(f"ours on Ray wrote the same bytes as ours by default: {'yes' if same else 'NO'}")
            codes_ok = codes_ok and same
    saved = _save(
        bench_dir / "results",
        "w1",
        {
            "machine": machine(),
            "product": product_version(),
            "sid_rows": sid_rows,
            "ours": ours.summary(),
            "ours_decoded_before": ours_again.summary(),
            "ours_ray": on_ray.summary(),
            "ours_ray_decoded_before": on_ray_again.summary(),
            "floor": floor.summary(),
            "baseline": base.summary(),
            "codes": [asdict(c) for c in comparisons],
            "codes_ok": codes_ok,
        },
    )
    typer.echo(f"\nresults: {saved}; logs (timestamped output): {bench_dir / 'w1' / 'logs'}")
    if not all(r.ok for r in (ours, ours_again, on_ray, on_ray_again, floor, base)) or codes_ok is False:
        raise typer.Exit(1)


def _parse_list(text: str, cast) -> list:
    return [cast(part.strip().replace("_", "")) for part in text.split(",") if part.strip()]


@app.command()
def w2(
    pois: Annotated[str, typer.Option(help="POI count(s), comma-separated, e.g. 500000,2000000.")] = "500000",
    formats: Annotated[str, typer.Option("--format", help="Output format(s): csv, parquet or csv,parquet.")] = "csv",
    repeat: Annotated[int, typer.Option(min=1, help="Runs per system; the table shows the median wall time.")] = 1,
    dense: Annotated[bool, typer.Option(help="Dense 'features' column input instead of 'indices' (small N).")] = False,
    row_profile: Annotated[
        str, typer.Option(help="nyc (real NYC nonzero counts, mean ~15) or max (22 per row).")
    ] = "nyc",
    baseline: Annotated[bool, typer.Option(help="Also run the single-process torch baseline.")] = True,
    check: Annotated[bool, typer.Option(help="Compare the codes of both systems.")] = True,
    keep_outputs: Annotated[bool, typer.Option(help="Keep the (large) output files.")] = False,
    extra_args: Annotated[
        str, typer.Option(help="Extra arguments for the rqvae_ray CLI, e.g. '--batch-size 4096'.")
    ] = "",
    baseline_args: Annotated[
        str, typer.Option(help="Extra arguments for the baseline, e.g. '--device cuda' on a GPU machine.")
    ] = "",
    job_floor: Annotated[
        bool,
        typer.Option(
            help="Also measure this machine's floor for the job: the encoder's CPU seconds over the cores, plus "
            "the floor of Ray Data."
        ),
    ] = True,
    bench_dir: BenchDir = Path(".bench"),
    verbose: Verbose = False,
) -> None:
    """W2, scale: N synthetic NYC-shaped POIs in Parquet shards, 5 NYC models; ours vs a careful torch baseline."""
    from benchmarks.generate import NYC_MODELS, cached_hub

    bench_dir = prepare_bench_dir(bench_dir)
    counts = _parse_list(pois, int)
    fmts = _parse_list(formats, str)
    if not counts or any(n < 1 for n in counts):
        raise typer.BadParameter("--pois needs positive integers")
    if any(f not in ("csv", "parquet") for f in fmts):
        raise typer.BadParameter("--format takes csv and/or parquet")
    if row_profile not in ("nyc", "max"):
        raise typer.BadParameter("--row-profile takes nyc or max")
    if dense and max(counts) > 250_000:
        raise typer.BadParameter("--dense writes 5.6 KiB per POI; use it with --pois up to 250000")
    typer.echo(f"machine: {machine()}")
    typer.echo(f"product: {product_version()}")
    pairs: list[tuple[SystemResult, SystemResult]] = []
    comparisons: dict[str, list[CodeComparison]] = {}
    floors: dict[int, JobFloor] = {}
    for n in counts:
        suffix = ("-dense" if dense else "") + ("-max" if row_profile == "max" else "")
        hub_dir = bench_dir / f"w2_hub_n{n}{suffix}"
        started = time.perf_counter()
        hub = cached_hub(hub_dir, n, dense=dense, profile=row_profile, progress=lambda _: None)
        stamp = json.loads((hub / "benchmarks-generator.json").read_text())
        typer.echo(
            f"W2: hub {hub} ({n:,} POIs, mean {stamp['mean_nonzeros']:.1f} nonzeros/row, ready in "
            f"{time.perf_counter() - started:.0f}s)"
        )
        rates: list[float | None] = []  # the encoder's, measured right before each of ours' runs
        for fmt in fmts:
            tag = f"n{n}{suffix}-{fmt}"
            out_ours, out_base = bench_dir / "w2" / tag / "ours", bench_dir / "w2" / tag / "baseline"
            sid_rows = n * len(NYC_MODELS)
            ours = SystemResult(f"W2 {fmt}", "ours (rqvae_ray CLI)", n, len(NYC_MODELS), sid_rows)
            base = SystemResult(f"W2 {fmt}", "baseline (torch, 1 process)", n, len(NYC_MODELS), sid_rows)
            for run in range(1, repeat + 1):
                systems = [
                    (
                        ours,
                        [
                            _python(),
                            "-m",
                            "rqvae_ray.run",
                            *NYC_MODELS,
                            "--hub-dir",
                            str(hub),
                            "--out-dir",
                            str(out_ours),
                            "--force",
                            "--format",
                            fmt,
                            *extra_args.split(),
                        ],
                        bench_dir / "w2" / "logs" / f"{tag}-ours-{run}.log",
                    )
                ]
                if baseline:
                    systems.append(
                        (
                            base,
                            [
                                _python(),
                                "-m",
                                "benchmarks.baseline",
                                *NYC_MODELS,
                                "--hub-dir",
                                str(hub),
                                "--out-dir",
                                str(out_base),
                                "--format",
                                fmt,
                                *baseline_args.split(),
                            ],
                            bench_dir / "w2" / "logs" / f"{tag}-baseline-{run}.log",
                        )
                    )
                if job_floor:
                    typer.echo(f"  {fmt}, run {run}/{repeat}: the encoder's rate for the floor for the job ...")
                    rates.append(_encoder_rate(hub, bench_dir / "w2" / "logs" / f"{tag}-job-floor-{run}.log", verbose))
                for result, command, log in systems:
                    _run_system(result, f"{fmt}, run {run}/{repeat}", command, log, verbose)
            if check and baseline and ours.ok and base.ok:
                comparisons[tag] = [
                    compare_files(m, output_file(out_ours, m, fmt), output_file(out_base, m, fmt)) for m in NYC_MODELS
                ]
            if not keep_outputs:
                shutil.rmtree(bench_dir / "w2" / tag, ignore_errors=True)
            pairs.append((ours, base))
        if job_floor:
            floors[n] = _job_floor(n * len(NYC_MODELS), rates, bench_dir / "w2" / "logs", verbose)
    typer.echo("")
    print_table([(ours, [base]) for ours, base in pairs])
    typer.echo("")
    typer.echo("goals (ours):")
    for ours, base in pairs:
        if not ours.ok:
            continue
        fmt = ours.workload.split()[-1]
        if base.ok:
            goal = W2_WALL_GOALS[fmt]
            _goal(
                f"{ours.workload} N={ours.pois:,} wall ours/baseline <= {goal}",
                ours.wall_s <= goal * base.wall_s,
                f"{_ratio(ours.wall_s, base.wall_s)} ({ours.wall_s:.1f}s vs {base.wall_s:.1f}s; "
                f"{ours.rows_per_s:,.0f} vs {base.rows_per_s:,.0f} SID rows/s)",
            )
        floor = floors.get(ours.pois)
        if floor is not None:
            _goal(
                f"{ours.workload} N={ours.pois:,} wall <= {W2_JOB_FLOOR_GOAL}x this machine's floor for the job",
                floor.ok and ours.wall_s <= W2_JOB_FLOOR_GOAL * floor.wall_s,
                f"{_ratio(ours.wall_s, floor.wall_s)} ({ours.wall_s:.1f}s vs {floor.describe()})"
                if floor.ok
                else f"the floor could not be measured (logs: {bench_dir / 'w2' / 'logs'})",
            )
        pss = ours.peak_pss if ours.peak_pss is not None else ours.peak_rss
        _goal(
            f"{ours.workload} N={ours.pois:,} peak PSS of all processes <= 2 GiB",
            pss <= W2_MEMORY_GOAL,
            f"PSS sum {_gib(ours.peak_pss)} GiB over {ours.peak_processes} processes "
            f"(RSS sum {_gib(ours.peak_rss)} GiB)",
        )
    for fmt in fmts:
        runs = [o for o, _ in pairs if o.workload == f"W2 {fmt}" and o.ok]
        if len(runs) > 1:
            low, high = min(runs, key=lambda r: r.pois), max(runs, key=lambda r: r.pois)
            low_mem, high_mem = (low.peak_pss or low.peak_rss), (high.peak_pss or high.peak_rss)
            growth = high_mem / low_mem
            _goal(
                f"W2 {fmt} peak PSS flat in N (at N={high.pois:,} <= {FLAT_TOLERANCE}x at N={low.pois:,})",
                growth <= FLAT_TOLERANCE,
                f"{_gib(low.peak_pss)} -> {_gib(high.peak_pss)} GiB ({growth:.3f}x), processes "
                f"{low.peak_processes} -> {high.peak_processes}; RSS {_gib(low.peak_rss)} -> {_gib(high.peak_rss)} GiB",
            )
    codes_ok = True
    for tag, items in comparisons.items():
        typer.echo(f"\n[{tag}]")
        codes_ok = _report_codes(items) and codes_ok
    saved = _save(
        bench_dir / "results",
        "w2",
        {
            "machine": machine(),
            "product": product_version(),
            "results": [r.summary() for pair in pairs for r in pair if r.runs],
            "codes": {tag: [asdict(c) for c in items] for tag, items in comparisons.items()},
            "job_floors": {n: floor.summary() for n, floor in floors.items()},
        },
    )
    typer.echo(f"\nresults: {saved}; logs (timestamped output): {bench_dir / 'w2' / 'logs'}")
    floors_ok = all(floor.ok for floor in floors.values())
    if not all(o.ok and (b.ok or not baseline) for o, b in pairs) or not codes_ok or not floors_ok:
        raise typer.Exit(1)


@app.command()
def ceiling(
    pois: Annotated[str, typer.Option(help="The two POI counts whose difference is measured.")] = "250000,1000000",
    formats: Annotated[str, typer.Option("--format", help="Output format(s): csv, parquet or csv,parquet.")] = (
        "csv,parquet"
    ),
    executors: Annotated[str, typer.Option("--executor", help="Executor(s): ray, local or ray,local.")] = "ray,local",
    repeat: Annotated[int, typer.Option(min=1, help="Pairs of runs per system; the figures are medians.")] = 1,
    extra_args: Annotated[str, typer.Option(help="Extra arguments for benchmarks.stand_in.")] = "",
    bench_dir: BenchDir = Path(".bench"),
    verbose: Verbose = False,
) -> None:
    """The ceiling: the real pipeline with an encoder that does no math, at two sizes (start-up cancels), against the
    disk writing the same bytes; SID rows/s streamed, CPU seconds per process role, streaming/disk."""
    from benchmarks.ceiling import Ceiling, Pair, disk_write_seconds, output_bytes
    from benchmarks.generate import NYC_MODELS, cached_hub

    bench_dir = prepare_bench_dir(bench_dir)
    counts = _parse_list(pois, int)
    fmts = _parse_list(formats, str)
    modes = _parse_list(executors, str)
    if len(counts) != 2 or not 0 < counts[0] < counts[1]:
        raise typer.BadParameter("--pois takes two counts, the smaller first")
    if any(f not in ("csv", "parquet") for f in fmts) or any(m not in ("ray", "local") for m in modes):
        raise typer.BadParameter("--format takes csv and/or parquet, --executor ray and/or local")
    typer.echo(f"machine: {machine()}")
    typer.echo(f"product: {product_version()}")
    hubs = [cached_hub(bench_dir / f"w2_hub_n{n}", n, progress=lambda _: None) for n in counts]
    systems = [Ceiling(mode, fmt, (counts[0], counts[1]), len(NYC_MODELS)) for fmt in fmts for mode in modes]
    for run in range(1, repeat + 1):
        for system in systems:
            tag = f"{system.fmt}-{system.executor}"
            measured = []
            for n, hub in zip(counts, hubs, strict=True):
                out = bench_dir / "ceiling" / tag / f"n{n}"
                shutil.rmtree(out, ignore_errors=True)
                command = [
                    *[_python(), "-m", "benchmarks.stand_in", "--hub-dir", str(hub), "--out-dir", str(out)],
                    *["--format", system.fmt, "--executor", system.executor, *extra_args.split()],
                ]
                typer.echo(f"  run {run}/{repeat}: {tag}, {n:,} POIs ...")
                measurement = _measure(command, bench_dir / "ceiling" / "logs" / f"{tag}-n{n}-{run}.log", verbose)
                typer.echo(f"    {measurement.wall_s:.2f}s, exit {measurement.returncode}, {_load_note(measurement)}")
                measured.append((measurement, output_bytes(out)))
            (small, small_bytes), (big, big_bytes) = measured
            added = max(big_bytes - small_bytes, 1)
            direct_s = disk_write_seconds(bench_dir / "ceiling" / tag, added, direct=True)
            cached_s = disk_write_seconds(bench_dir / "ceiling" / tag, added, direct=False)
            typer.echo(
                f"    disk: {added / 1e9:.2f} GB written and fsync'd in {direct_s:.2f}s past the page cache, "
                f"{cached_s:.2f}s through it"
            )
            system.pairs.append(Pair(small, big, added, direct_s, cached_s))
            shutil.rmtree(bench_dir / "ceiling" / tag, ignore_errors=True)
    typer.echo("")
    for system in systems:
        if system.ok:
            typer.echo("\n".join(system.report()))
        else:
            typer.echo(f"{system.fmt} on {system.executor}: FAILED (logs in {bench_dir / 'ceiling' / 'logs'})")
    typer.echo("")
    typer.echo("goals (ours on Ray):")
    for system in systems:
        if system.executor == "ray" and system.ok:
            _goal(
                f"ceiling {system.fmt}: streaming <= {CEILING_DISK_GOAL}x the disk's time for the same bytes",
                system.ratio <= CEILING_DISK_GOAL,
                f"{system.ratio:.2f}x ({system.added_wall_s:.1f}s vs {system.disk_s:.1f}s; against the disk through "
                f"the page cache {system.cached_ratio:.2f}x)",
            )
    saved = _save(
        bench_dir / "results",
        "ceiling",
        {"machine": machine(), "product": product_version(), "systems": [s.summary() for s in systems]},
    )
    typer.echo(f"\nresults: {saved}; logs: {bench_dir / 'ceiling' / 'logs'}")
    if not all(system.ok for system in systems):
        raise typer.Exit(1)


if __name__ == "__main__":
    app(prog_name="python -m benchmarks")
