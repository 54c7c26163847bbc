"""The command line: ``python -m rqvae_ray.run`` / ``rqvae-ray``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from rqvae_ray.contract import OutputFormat, OutputSpec
from rqvae_ray.errors import RayConnectionLost, RqvaeRayError
from rqvae_ray.model_ids import DEFAULT_MODELS, read_models_file, split_model_ids
from rqvae_ray.options import RunOptions, check_setup
from rqvae_ray.pipeline import ModelResult, run_models
from rqvae_ray.plan import PoolMode, PoolSizing
from rqvae_ray.progress import Progress
from rqvae_ray.stores import HfHub, LocalHub

DEMO_HUB = Path("demo_hub")
DEMO_OUT = Path("demo_out")
# Positionals that are values, not model IDs: what `--force true` leaves behind.
FLAG_VALUES = {"true", "false", "yes", "no", "on", "off", "1", "0"}

app = typer.Typer(add_completion=False, help="Turn POI features into semantic IDs with RQ-VAE models on Ray.")


def _flag(name: str, help: str):  # noqa: A002 - typer's own parameter name
    """A boolean option shown as a plain flag (no value) in --help."""
    return typer.Option(name, help=help, metavar="")


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _table(results: list[ModelResult]) -> str:
    header = ("model", "status", "rows", "unique SIDs", "POIs sharing an SID", "seconds", "output / reason")
    rows = [
        (
            r.model_id,
            ("skipped" if r.skipped else "ok") if r.ok else "FAILED",
            str(r.rows) if r.ok else "-",
            str(r.unique_sids) if r.ok else "-",
            str(r.shared_pois) if r.ok else "-",
            f"{r.seconds:.1f}",
            (r.path or f"uploaded @ {r.commit}") if r.ok else r.error,
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header[:-1])]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(widths[i]) if i < len(widths) else cell for i, cell in enumerate(row)]
        lines.append("  ".join(cells))
    return "\n".join(lines)


@app.command()
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
    upload: Annotated[bool, _flag("--upload", "Upload to the Hub even when --out-dir is given.")] = False,
    dataset: Annotated[
        str | None, typer.Option(help="Only run the models of this dataset (a name such as nyc, or ORG/DATASET).")
    ] = None,
    demo: Annotated[bool, _flag("--demo", f"Build ./{DEMO_HUB} if missing and write to ./{DEMO_OUT}.")] = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag, commit) of the model repos.")] = None,
    dataset_revision: Annotated[str | None, typer.Option(help="Hub revision of the dataset repos.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
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
    force: Annotated[bool, _flag("--force", "Redo outputs that are already up to date.")] = False,
    dedup: Annotated[
        bool, _flag("--dedup", "Give POIs that share an SID one extra code 0, 1, 2, ... in Pid order.")
    ] = False,
    sid_tokens: Annotated[
        bool, _flag("--sid-tokens", "Add an SID column with the <a_x><b_y><c_z>[<d_w>] LLM tokens.")
    ] = False,
    actor_wait_s: Annotated[
        float, typer.Option(help="Fail if the cluster cannot hold a dataset's encoder actors within this many seconds.")
    ] = 600.0,
    upload_retries: Annotated[int, typer.Option(min=0, help="Retries of a failed upload commit.")] = 5,
    report_dir: Annotated[
        Path | None, typer.Option(help="Write sid_quality.json/.png here (default: --out-dir; none if uploading only).")
    ] = None,
    debug: Annotated[bool, _flag("--debug", "Show tracebacks.")] = False,
) -> None:
    """Encode every POI of each model's dataset and write one codebooks file per model."""
    values = [m for m in model_ids or [] if m.strip().lower() in FLAG_VALUES]
    if values:
        _err(f"{values[0]!r} is not a model ID: flags take no value (write --force, not --force {values[0]})")
        raise typer.Exit(2)
    requested = list(model_ids or [])
    if models_file is not None:
        try:
            requested += read_models_file(models_file)
        except RqvaeRayError as exc:
            _err(str(exc))
            raise typer.Exit(2) from None
    specs, bad_ids, duplicates = split_model_ids(requested or list(DEFAULT_MODELS))
    for reason in bad_ids.values():
        _err(f"invalid model ID {reason}")
    for model_id, count in duplicates.items():
        typer.echo(f"note: {model_id} was given {count} times; running it once")
    if not specs:
        raise typer.Exit(2)
    if dataset is not None:
        specs = [s for s in specs if dataset in (s.dataset, s.dataset_repo)]
        if not specs:
            _err(f"no requested model is a {dataset} model")
            raise typer.Exit(2)
    if actors_per_pool is not None:
        min_actors = max_actors = actors_per_pool
    if min_actors is not None and max_actors is not None and min_actors > max_actors:
        _err(f"--min-actors {min_actors} is larger than --max-actors {max_actors}")
        raise typer.Exit(2)
    if demo:
        hub_dir = hub_dir or DEMO_HUB
        out_dir = out_dir or DEMO_OUT
    try:
        if demo and not hub_dir.exists():
            from rqvae_ray.demo import build_demo_hub

            typer.echo(f"building the demo hub in {hub_dir} ...")
            build_demo_hub(hub_dir, progress=typer.echo)
        options = RunOptions(
            hub=HfHub(revision, dataset_revision) if hub_dir is None else LocalHub(hub_dir),
            out_dir=None if out_dir is None else str(out_dir.resolve()),
            upload=upload or out_dir is None,
            base_folder=base_folder,
            output=OutputSpec(output_format, dedup, sid_tokens),
            pools=PoolSizing(pools, min_actors, max_actors, cpus_per_actor, gpus_per_actor),
            batch_size=batch_size,
            actor_wait_s=actor_wait_s,
            address=address,
            force=force,
            upload_retries=upload_retries,
        )
        check_setup(options)
    except RqvaeRayError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    try:
        results = run_models(specs, options, Progress(typer.echo))
    except (KeyboardInterrupt, RayConnectionLost) as exc:
        lost = isinstance(exc, RayConnectionLost)
        _err(str(exc) if lost else "interrupted; finished outputs are kept, unfinished ones were not published")
        sys.stderr.flush()
        sys.stdout.flush()
        # Exit at once: a normal shutdown would race the dataset threads still inside Ray calls. Ray's local
        # processes and this run's actors end with the driver; partial files are cleaned up by the next run.
        os._exit(1 if lost else 130)
    except Exception as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _err(f"{type(exc).__name__}: {first} (--debug for details)")
        raise typer.Exit(1) from None
    for result in results:
        if not result.ok:
            _err(f"{result.model_id}: {result.error}")
    invalid = [
        ModelResult(model_id, "", ok=False, error=f"invalid model ID {why}") for model_id, why in bad_ids.items()
    ]
    results += invalid
    typer.echo("")
    typer.echo(_table(results))
    failed = [r for r in results if not r.ok]
    _report(results, report_dir or out_dir)
    typer.echo(f"\n{len(results) - len(failed)} of {len(results)} models succeeded")
    if failed:
        raise typer.Exit(1)


def _report(results: list[ModelResult], folder: Path | None) -> None:
    """Print the SID quality table and write the run's JSON + PNG report (a report failure is only a warning)."""
    from rqvae_ray.report import draw_quality_png, quality_table, write_quality_json

    reports = {r.model_id: r.quality for r in results if r.ok and r.quality}
    if not reports:
        return
    typer.echo("\nSID quality\n" + quality_table(reports))
    if folder is None:
        return
    try:
        json_path = write_quality_json(folder / "sid_quality.json", reports)
        png_path = draw_quality_png(folder / "sid_quality.png", reports)
    except RqvaeRayError as exc:
        _err(f"warning: the quality report was not written ({exc})")
        return
    typer.echo(f"quality report: {json_path} and {png_path}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="rqvae-ray")


if __name__ == "__main__":
    sys.exit(main())
