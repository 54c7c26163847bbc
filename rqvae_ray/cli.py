"""The command line: ``python -m rqvae_ray.run`` / ``rqvae-ray``."""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from rqvae_ray.model_ids import DEFAULT_MODELS, split_model_ids
from rqvae_ray.pipeline import ModelResult, RayConnectionLost
from rqvae_ray.runner import SetupError, run_specs

DEMO_HUB = Path("demo_hub")
DEMO_OUT = Path("demo_out")

app = typer.Typer(add_completion=False, help="Turn POI features into semantic IDs with RQ-VAE models on Ray.")


class Dataset(str, Enum):
    nyc = "nyc"
    tky = "tky"


class Format(str, Enum):
    csv = "csv"
    parquet = "parquet"


def _err(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def _table(results) -> str:
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
        list[str] | None, typer.Argument(help="Model IDs (org/name); default: the 10 published models.")
    ] = None,
    hub_dir: Annotated[
        Path | None, typer.Option(help="Read models and datasets from this local hub directory (default: the Hub).")
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option(help="Write outputs under this directory (default: upload to the Hub).")
    ] = None,
    upload: Annotated[bool, typer.Option("--upload", help="Upload to the Hub even when --out-dir is given.")] = False,
    dataset: Annotated[Dataset | None, typer.Option(help="Only run the models of this dataset.")] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help=f"Build ./{DEMO_HUB} if missing and write to ./{DEMO_OUT}.")
    ] = False,
    revision: Annotated[str | None, typer.Option(help="Hub revision (branch, tag, commit) of the model repos.")] = None,
    dataset_revision: Annotated[str | None, typer.Option(help="Hub revision of the dataset repos.")] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (default: RAY_ADDRESS, else local).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="POIs per batch.")] = 4096,
    actors_per_model: Annotated[int | None, typer.Option(min=1, help="Fixed actor-pool size per model.")] = None,
    min_actors: Annotated[int, typer.Option(min=1, help="Autoscaling pool: fewest actors per model.")] = 1,
    max_actors: Annotated[int, typer.Option(min=1, help="Autoscaling pool: most actors per model.")] = 1,
    cpus_per_actor: Annotated[float | None, typer.Option(min=0.0, help="CPUs reserved per encoder actor.")] = None,
    gpus_per_model: Annotated[
        float | None, typer.Option(min=0.0, help="GPUs per encoder actor, fractional allowed (default: auto).")
    ] = None,
    base_folder: Annotated[str, typer.Option(help="Output folder inside the dataset repo.")] = "LLM Dataset",
    output_format: Annotated[Format, typer.Option("--format", help="Output file format.")] = Format.csv,
    force: Annotated[bool, typer.Option("--force", help="Redo outputs that are already up to date.")] = False,
    dedup: Annotated[
        bool, typer.Option("--dedup", help="Give POIs that share an SID one extra code 0, 1, 2, ... in Pid order.")
    ] = False,
    sid_tokens: Annotated[
        bool, typer.Option("--sid-tokens", help="Add an SID column with the <a_x><b_y><c_z>[<d_w>] LLM tokens.")
    ] = False,
    actor_wait_s: Annotated[
        float, typer.Option(help="Fail if the cluster cannot hold a dataset's encoder actors within this many seconds.")
    ] = 600.0,
    upload_retries: Annotated[int, typer.Option(min=0, help="Retries of a failed upload commit.")] = 5,
    report_dir: Annotated[
        Path | None, typer.Option(help="Write sid_quality.json/.png here (default: --out-dir; none if uploading only).")
    ] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Encode every POI of each model's dataset and write one codebooks file per model."""
    specs, bad_ids = split_model_ids(model_ids or list(DEFAULT_MODELS))
    for reason in bad_ids.values():
        _err(f"invalid model ID {reason}")
    if not specs:
        raise typer.Exit(2)
    if dataset is not None:
        specs = [s for s in specs if s.dataset == dataset.value]
        if not specs:
            _err(f"no requested model is a {dataset.value} model")
            raise typer.Exit(2)
    if actors_per_model is not None:
        min_actors = max_actors = actors_per_model
    if min_actors > max_actors:
        _err(f"--min-actors {min_actors} is larger than --max-actors {max_actors}")
        raise typer.Exit(2)
    if demo:
        hub_dir = hub_dir or DEMO_HUB
        out_dir = out_dir or DEMO_OUT
    try:
        results = run_specs(
            specs,
            hub_dir=hub_dir,
            out_dir=out_dir,
            upload=upload or out_dir is None,
            build_demo=demo,
            revision=revision,
            dataset_revision=dataset_revision,
            address=address,
            progress=typer.echo,
            batch_size=batch_size,
            min_actors=min_actors,
            max_actors=max_actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_model=gpus_per_model,
            base_folder=base_folder,
            fmt=output_format.value,
            force=force,
            dedup=dedup,
            sid_tokens=sid_tokens,
            actor_wait_s=actor_wait_s,
            upload_retries=upload_retries,
        )
    except SetupError as exc:
        _err(str(exc))
        raise typer.Exit(2) from None
    except (KeyboardInterrupt, RayConnectionLost) as exc:
        lost = isinstance(exc, RayConnectionLost)
        _err(str(exc) if lost else "interrupted; finished outputs are kept, unfinished ones were not published")
        sys.stderr.flush()
        sys.stdout.flush()
        # Exit at once: a normal shutdown would race the dataset threads still inside Ray calls. Ray's local
        # processes and this run's actors end with the driver; staged files are cleaned up by the next run.
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
    from rqvae_ray.report import ReportError, draw_quality_png, quality_table, write_quality_json

    reports = {r.model_id: r.quality for r in results if r.ok and r.quality}
    if not reports:
        return
    typer.echo("\nSID quality\n" + quality_table(reports))
    if folder is None:
        return
    try:
        json_path = write_quality_json(folder / "sid_quality.json", reports)
        png_path = draw_quality_png(folder / "sid_quality.png", reports)
    except (ReportError, OSError) as exc:
        _err(f"warning: the quality report was not written ({exc})")
        return
    typer.echo(f"quality report: {json_path} and {png_path}")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="rqvae-ray")


if __name__ == "__main__":
    sys.exit(main())
