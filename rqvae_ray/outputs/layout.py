"""Where outputs go: the folder of a dataset's files and the names of the files in it.

Layout: ``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files/codebooks-<model>.<csv|parquet>`` (and
the files exported or written for ``--for`` presets beside it, ``codebooks-<model>.<index.json|sids.pt|prefixes.json>``
and :func:`preset_filename`) beside ``rqvae_ray-manifest.json``, which holds one entry per codebooks file (its exports
listed on it).
"""

from __future__ import annotations

from pathlib import Path

from rqvae_ray.core.contract import Export, OutputFormat
from rqvae_ray.core.presets import PresetFile

MANIFEST_FILE = "rqvae_ray-manifest.json"
_PRESET_SUFFIXES = {PresetFile.TIGER_TENSOR: "tiger.pt", PresetFile.GNPR_SID_V2_CSV: "gnpr-sid-v2.csv"}


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


def preset_filename(codebooks_file: str, file: PresetFile) -> str:
    """The name of a file written for a preset beside ``codebooks-<model>.<csv|parquet>`` (see :class:`PresetFile`)."""
    stem = codebooks_file.rsplit(".", 1)[0]
    if file is PresetFile.ITEMS_INDEX_JSON:
        # MiniOneRec's TokenExtender opens <dir>/<name up to its first dot>.index.json: no dot before the suffix.
        return f"{stem.replace('.', '_')}-items.index.json"
    return f"{stem}.{_PRESET_SUFFIXES[file]}"


def written_filenames(codebooks_file: str) -> set[str]:
    """Every name a file exported or written for a preset beside ``codebooks_file`` may have."""
    exported = {export_filename(codebooks_file, export) for export in Export}
    return exported | {preset_filename(codebooks_file, file) for file in PresetFile}
