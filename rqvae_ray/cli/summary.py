"""The summary of a run, one row per model: the table the command line prints, ``--summary-json``, and
:func:`results_frame` for notebooks, all from :func:`summary_rows`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.outputs.staging import atomic_write
from rqvae_ray.pipeline.results import ModelResult

COLUMNS = {
    "model": "model",
    "dataset": "dataset",
    "status": "status",
    "rows": "rows",
    "unique_sids": "unique SIDs",
    "pois_sharing_an_sid": "POIs sharing an SID",
    "moved_pois": "moved",
    "extra_distance": "extra dist",
    "encode_s": "encode s",
    "dataset_s": "dataset s",
    "output": "output / reason",
}
LEGEND = (
    "encode s: the time this model's encoder took, summed over its actors or threads; dataset s: the wall time of the "
    "model's whole dataset (loading, the executor's start-up, encoding all its models, writing, uploading)"
)
CAP_LEGEND = (
    "moved: POIs that --max-per-sid moved to another SID; extra dist: the mean increase of a moved POI's squared "
    "quantization error |z - q|^2"
)
CAP_KEYS = ("moved_pois", "extra_distance")


def _shown_path(path: str, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it is under it."""
    try:
        return str(Path(path).relative_to(cwd))
    except ValueError:
        return path


def summary_rows(results: Sequence[ModelResult], cwd: Path | None = None) -> list[dict]:
    """One row per model with the :data:`COLUMNS` keys (numbers as numbers; None where there is none)."""
    cwd = Path.cwd() if cwd is None else cwd
    rows = []
    for r in results:
        done = r.ok and not r.skipped
        if r.ok:
            output = _shown_path(r.path, cwd) if r.path else f"uploaded @ {r.commit}"
        else:
            output = r.error
        cap = r.quality.get("cap") if r.ok else None
        rows.append(
            {
                "model": r.model_id,
                "dataset": r.dataset,
                "status": ("skipped" if r.skipped else "ok") if r.ok else "FAILED",
                "rows": r.rows if r.ok else None,
                "unique_sids": r.unique_sids if r.ok else None,
                "pois_sharing_an_sid": r.shared_pois if r.ok else None,
                "moved_pois": cap["moved_pois"] if cap else None,
                "extra_distance": cap["extra_distance_mean"] if cap else None,
                "encode_s": round(r.encode_seconds, 2) if done else None,
                "dataset_s": round(r.dataset_seconds, 2) if r.dataset else None,
                "output": output,
            }
        )
    return rows


def table_text(results: Sequence[ModelResult], cwd: Path | None = None) -> str:
    """The summary as a plain-text table (aligned columns), with a legend."""
    rows = summary_rows(results, cwd)
    capped = any(row[key] is not None for row in rows for key in CAP_KEYS)
    shown = [key for key in COLUMNS if capped or key not in CAP_KEYS]
    cells = [[COLUMNS[key] for key in shown]]
    for row in rows:
        cells.append([_cell(key, row[key]) for key in shown])
    widths = [max(len(line[i]) for line in cells) for i in range(len(shown) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(line, widths, strict=False)), line[-1]]) for line in cells]
    return "\n".join([*lines, "", LEGEND, *([CAP_LEGEND] if capped else [])])


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key.endswith("_s"):
        return f"{value:.1f}"
    return f"{value:.4g}" if key == "extra_distance" else str(value)


def results_frame(results: Sequence[ModelResult]):
    """The summary table of a run's results as a pandas DataFrame (one row per model, the :data:`COLUMNS` keys)."""
    import pandas as pd

    # Nullable dtypes: a failed model's counts are missing, not NaN floats.
    return pd.DataFrame(summary_rows(results), columns=list(COLUMNS)).convert_dtypes()


def write_summary_json(path: Path, results: Sequence[ModelResult], exit_code: int, reason: str, log: str) -> Path:
    """``--summary-json``: the table, each model's SID quality figures, the exit status and its reason."""
    models = [
        {
            **row,
            "sha256": r.sha256 or None,
            "commit": r.commit or None,
            "quality": r.quality or None,
            "exports": [asdict(record) for record in r.exports],
        }
        for row, r in zip(summary_rows(results), results, strict=True)
    ]
    document = {
        "tool": "rqvae_ray",
        "tool_version": __version__,
        "exit_code": exit_code,
        "exit_reason": reason,
        "log_file": log,
        "models": models,
    }
    data = (json.dumps(document, indent=2) + "\n").encode()
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda partial: partial.write_bytes(data))
