"""The notebook-facing API: the in-process encoder gives the pipeline's bits; results as a DataFrame."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import rqvae_ray
from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.errors import CheckpointError, DatasetError, InputDimensionError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.outputs.layout import codebooks_filename, output_dir
from rqvae_ray.pipeline.results import ModelResult
from tests.pipeline.test_pipeline import features_of


@pytest.mark.parametrize("model_id", [DEFAULT_MODELS[2], DEFAULT_MODELS[9]])
def test_load_model_gives_the_pipelines_bits(demo_run, demo_hub, model_id):
    out, _ = demo_run
    spec = parse_model_id(model_id)
    path = demo_hub / "models" / spec.org / spec.name / "rqvae_best.pt"
    frame = rqvae_ray.read_codebooks(
        output_dir(out, spec.dataset_repo, "LLM Dataset") / codebooks_filename(spec.name, OutputFormat.CSV)
    )
    want_codes = np.array(frame["Codebook"].tolist(), dtype=np.int32)
    want_vectors = np.stack(frame["Vector"].to_numpy())
    features = features_of(demo_hub, spec.dataset)
    for model in (rqvae_ray.load_model(path), rqvae_ray.load_model(path.read_bytes())):
        codes, vectors = model.encode(features)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(vectors, want_vectors)
        # A few POIs at a time, as sparse index lists (a new venue at serving time): the same bits.
        picks = [0, 17, 4000, len(features) - 1]
        sparse = [np.flatnonzero(features[i]).tolist() for i in picks]
        few_codes, few_vectors = model.encode(sparse)
        np.testing.assert_array_equal(few_codes, want_codes[picks])
        np.testing.assert_array_equal(few_vectors, want_vectors[picks])


def test_load_model_refuses_bad_input(demo_hub, tmp_path):
    spec = parse_model_id(DEFAULT_MODELS[0])
    model = rqvae_ray.load_model(demo_hub / "models" / spec.org / spec.name / "rqvae_best.pt")
    assert model.input_dim == 1407 and model.codebook_sizes == (32, 32, 32)
    with pytest.raises(DatasetError, match="1406 columns but the model takes 1407"):
        model.encode(np.zeros((2, 1406), dtype=np.float32))
    bad = np.zeros((2, 1407), dtype=np.float32)
    bad[1, 5] = np.nan
    with pytest.raises(DatasetError, match="NaN or Inf"):
        model.encode(bad)
    with pytest.raises(InputDimensionError):
        model.encode([[0, 5000]])
    with pytest.raises(DatasetError, match="twice"):
        model.encode([[3, 3]])
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        rqvae_ray.load_model(tmp_path / "x.pt")


def test_results_frame_is_the_printed_table():
    results = [
        ModelResult(
            "org/rqvae-nyc-a",
            "org/nyc",
            ok=True,
            rows=10,
            encode_seconds=1.25,
            dataset_seconds=3.5,
            path="/elsewhere/codebooks-rqvae-nyc-a.csv",
            quality={"unique_sids": 7, "pois_in_collided_buckets": 5},
        ),
        ModelResult("org/rqvae-nyc-b", "org/nyc", ok=False, error="corrupt", dataset_seconds=3.5),
    ]
    frame = rqvae_ray.results_frame(results)
    assert list(frame["model"]) == ["org/rqvae-nyc-a", "org/rqvae-nyc-b"]
    assert list(frame["status"]) == ["ok", "FAILED"]
    assert frame.loc[0, "unique_sids"] == 7 and frame.loc[0, "pois_sharing_an_sid"] == 5
    assert frame.loc[0, "encode_s"] == 1.25 and frame.loc[0, "output"] == "/elsewhere/codebooks-rqvae-nyc-a.csv"
    assert frame.loc[1, "output"] == "corrupt" and pd.isna(frame.loc[1, "rows"])
    assert str(frame["rows"].dtype) == "Int64"


def test_importing_the_package_loads_no_heavy_module():
    code = "import sys, rqvae_ray; print(sorted(m for m in ('torch', 'pandas', 'pyarrow', 'ray') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout.replace("'", '"')) == []
