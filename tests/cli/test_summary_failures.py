"""What the command line says when its own reports cannot be written: a --summary-json that cannot be written fails
a run that would otherwise succeed, with one error line; a quality report that cannot be written is a warning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rqvae_ray.cli.app import app
from rqvae_ray.inputs.demo import fit_checkpoint, write_dataset
from rqvae_ray.inputs.model_ids import parse_model_id
from rqvae_ray.inputs.stores import CHECKPOINT_FILE

MODEL = "good/rqvae-nyc-ok"
POIS, DIM = 120, 24


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A hub of one small NYC-named model and its dataset of ``POIS`` multi-hot POIs."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(7)
    features = (rng.random((POIS, DIM)) < 0.2).astype(np.float32)
    features[:, 0] = 1.0  # every POI has a feature
    spec = parse_model_id(MODEL)
    write_dataset(
        root,
        spec.dataset_repo,
        features,
        {"total_dim": DIM, "num_pois": POIS},
        [(f"p{i}", i) for i in range(1, POIS + 1)],
    )
    checkpoint = root / "models" / spec.org / spec.name / CHECKPOINT_FILE
    checkpoint.parent.mkdir(parents=True)
    torch.save(fit_checkpoint(spec, features), checkpoint)
    return root


def _run(hub: Path, out: Path, *args: str):
    return CliRunner().invoke(app, [MODEL, "--hub-dir", str(hub), "--out-dir", str(out), "--quiet", "--debug", *args])


def test_a_run_that_succeeds_without_its_summary_json_fails_with_one_error_line(hub, tmp_path):
    (tmp_path / "taken").write_text("a file where the summary's folder must go")
    summary = tmp_path / "taken" / "summary.json"
    result = _run(hub, tmp_path / "out", "--summary-json", str(summary))
    assert result.exit_code == 1, result.output
    assert "1 of 1 models succeeded" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(summary) in errors[0], result.stderr
    assert not summary.parent.is_dir()


def test_a_summary_json_that_is_written_keeps_the_runs_status(hub, tmp_path):
    summary = tmp_path / "reports" / "summary.json"
    result = _run(hub, tmp_path / "out", "--summary-json", str(summary))
    assert result.exit_code == 0, result.output
    assert summary.is_file() and "error:" not in result.stderr


def test_a_quality_report_that_cannot_be_written_is_a_warning(hub, tmp_path):
    (tmp_path / "taken").write_text("a file where the report folder must go")
    result = _run(hub, tmp_path / "out", "--report-dir", str(tmp_path / "taken"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the quality report was not written ("), result.stderr
    assert str(tmp_path / "taken") in lines[0]
