"""One entry point shared by the CLI and the Python API: check the setup, start Ray, run the pipeline."""

from __future__ import annotations

from pathlib import Path

from rqvae_ray.errors import OutputError, ResourceNotFoundError, UploadError
from rqvae_ray.model_ids import ModelSpec
from rqvae_ray.pipeline import ModelResult, Progress, RunOptions, check_out_dir, run_models
from rqvae_ray.stores import HfHub, LocalHub
from rqvae_ray.upload import require_token


class SetupError(RuntimeError):
    """A problem found before any inference starts (no token, unwritable output, missing hub directory)."""


def run_specs(
    specs: list[ModelSpec],
    *,
    hub_dir: Path | str | None,
    out_dir: Path | str | None,
    upload: bool,
    build_demo: bool = False,
    revision: str | None = None,
    dataset_revision: str | None = None,
    address: str | None = None,
    progress: Progress = print,
    **options,
) -> list[ModelResult]:
    """Validate the setup, then run ``specs`` on Ray; ``options`` are :class:`RunOptions` fields."""
    if out_dir is None and not upload:
        raise SetupError("nothing would be written: give --out-dir, or upload to the Hub")
    try:
        if upload:
            require_token()
        if out_dir is not None:
            out_dir = str(Path(out_dir).resolve())
            check_out_dir(out_dir)
        if hub_dir is None:
            hub: LocalHub | HfHub = HfHub(revision, dataset_revision)
        else:
            if build_demo and not Path(hub_dir).exists():
                from rqvae_ray.demo import build_demo_hub

                progress(f"building the demo hub in {hub_dir} ...")
                build_demo_hub(hub_dir, progress=progress)
            hub = LocalHub(hub_dir)
    except (UploadError, OutputError, ResourceNotFoundError) as exc:
        raise SetupError(str(exc)) from None
    run_options = RunOptions(hub=hub, out_dir=out_dir, upload=upload, **options)
    return run_models(specs, run_options, progress=progress, address=address)
