"""Where outputs go: the folder of a dataset's files and the names of the files in it.

Layout: ``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files/codebooks-<model>.<csv|parquet>`` (and
the files exported beside it, ``codebooks-<model>.<index.json|sids.pt|prefixes.json>``) beside
``rqvae_ray-manifest.json``, which holds one entry per codebooks file (its exports listed on it).
"""

from __future__ import annotations

from pathlib import Path

from rqvae_ray.core.contract import Export, OutputFormat

MANIFEST_FILE = "rqvae_ray-manifest.json"


def output_dir(root: Path, repo: str, base_folder: str) -> Path:
    """``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files``."""
    return root / "datasets" / repo / repo_folder(base_folder)


def repo_folder(base_folder: str) -> str:
    """Where the outputs live inside a dataset repo: ``<base folder>/Intermediate Files``."""
    return f"{base_folder}/Intermediate Files"


def codebooks_filename(model_name: str, fmt: OutputFormat) -> str:
    """``codebooks-<model name>.<csv|parquet>``."""
    return f"codebooks-{model_name}.{fmt.extension}"


def export_filename(codebooks_file: str, export: Export) -> str:
    """``codebooks-<model>.<suffix>`` of an export of ``codebooks-<model>.<csv|parquet>``."""
    return f"{codebooks_file.rsplit('.', 1)[0]}.{export.suffix}"
