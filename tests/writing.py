"""Helpers that wire the encode stage and the dataset writer by hand, as an executor does."""

from __future__ import annotations

from pathlib import Path

from rqvae_ray.core.contract import OutputFormat, OutputSpec, StageModel
from rqvae_ray.inputs.model_ids import ModelSpec
from rqvae_ray.outputs.layout import codebooks_filename, output_dir
from rqvae_ray.outputs.targets import DatasetOutput, ModelTarget
from rqvae_ray.outputs.writer import DatasetWriter
from rqvae_ray.stages.encode import EncodeModels


def dataset_output(
    repo: str,
    targets: list[ModelTarget],
    out_dir: str | Path | None,
    spec: OutputSpec,
    num_pois: int,
    first_pid: int = 1,
    base_folder: str = "LLM Dataset",
) -> DatasetOutput:
    folder = None if out_dir is None else output_dir(Path(out_dir), repo, base_folder)
    return DatasetOutput(
        repo=repo,
        targets=tuple(targets),
        folder=folder,
        base_folder=base_folder,
        spec=spec,
        num_pois=num_pois,
        first_pid=first_pid,
    )


def dataset_writer(*args, **kwargs) -> DatasetWriter:
    """A writer of :func:`dataset_output`'s arguments."""
    return DatasetWriter(dataset_output(*args, **kwargs))


def encode_stage(repo: str, models: list[tuple], spec: OutputSpec, keep_inputs: bool = False) -> EncodeModels:
    """The encode stage of ``(model ID, slot, weights)`` models."""
    return EncodeModels(repo=repo, models=[StageModel(*m) for m in models], spec=spec, keep_inputs=keep_inputs)


def csv_name(spec: ModelSpec) -> str:
    """The name of ``spec``'s codebooks file in CSV."""
    return codebooks_filename(spec.name, OutputFormat.CSV)
