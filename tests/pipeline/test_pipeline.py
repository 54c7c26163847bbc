"""End to end: the CLI on the demo hub under local Ray, exactness of every output, and invariance of the bytes."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id, parse_model_ids
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.pipeline.options import ExecutorMode, PoolMode, PoolSizing, RunOptions
from rqvae_ray.pipeline.progress import Quiet
from rqvae_ray.runner import run_models
from tests.conftest import run_cli
from tests.reference import reference_sids
from tests.writing import csv_name

SPECS = [parse_model_id(m) for m in DEFAULT_MODELS]


def output_path(out, spec, base="LLM Dataset"):
    return out / "datasets" / spec.org / spec.dataset / base / "Intermediate Files" / csv_name(spec)


def read_rows(path):
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        return header, list(reader)


def features_of(hub, dataset):
    return torch.load(hub / "datasets" / "comp5331poi" / dataset / "RQVAE Dataset" / "poi_features.pt").numpy()


def test_cli_help():
    proc = run_cli("--help", timeout=60)
    assert proc.returncode == 0
    for option in ("--hub-dir", "--out-dir", "--dataset", "--demo", "--batch-size", "--gpus-per-actor", "--pools"):
        assert option in proc.stdout
    diff = subprocess.run(
        [sys.executable, "-m", "rqvae_ray.diff", "--help"], capture_output=True, text=True, timeout=60
    )
    assert diff.returncode == 0 and "--json" in diff.stdout
    for text in (proc.stdout, diff.stdout):  # flags, --help among them, are not shown as taking a value
        assert "--help" in text and "<bool>" not in text


def test_layout_header_order_and_floats(demo_run, demo_hub):
    out, proc = demo_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    manifests = [
        f"datasets/comp5331poi/{d}/LLM Dataset/Intermediate Files/rqvae_ray-manifest.json" for d in ("nyc", "tky")
    ]
    reports = ["sid_quality.json", "sid_quality.png"]
    assert files == sorted([output_path(out, s).relative_to(out).as_posix() for s in SPECS] + manifests + reports)
    quality = json.loads((out / "sid_quality.json").read_text())["models"]
    assert sorted(quality) == sorted(s.model_id for s in SPECS)
    assert "SID quality" in proc.stdout and (out / "sid_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for dataset, n in (("nyc", 5135), ("tky", 7900)):
        spec = next(s for s in SPECS if s.dataset == dataset)
        header, rows = read_rows(output_path(out, spec))
        assert header == ["Pid", "Codebook", "Vector"]
        assert [int(r[0]) for r in rows] == list(range(1, n + 1))
        for _pid, codebook, vector in rows[:200]:
            assert ast.literal_eval(codebook) == json.loads(codebook)
            values = json.loads(vector)
            assert values == ast.literal_eval(vector) and len(values) == 64
            # each printed float parses back to a float32 that prints the same way again
            for text in vector[1:-1].split(", "):
                assert str(np.float32(float(text))) == text or np.float32(float(text)) == np.float32(text)
    for spec in SPECS:
        assert spec.model_id in proc.stdout
    assert "10 of 10 models succeeded" in proc.stdout


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_output_matches_the_reference_encoder(demo_run, demo_hub, spec):
    out, _ = demo_run
    state = torch.load(demo_hub / "models" / spec.org / spec.name / "rqvae_best.pt", weights_only=True)
    codes, vectors = reference_sids(state["model_state_dict"], features_of(demo_hub, spec.dataset))
    _, rows = read_rows(output_path(out, spec))
    got_codes = np.array([json.loads(r[1]) for r in rows])
    got_vectors = np.array([json.loads(r[2]) for r in rows], dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_allclose(got_vectors, vectors, atol=1e-5, rtol=0)
    # the written decimals parse back to exactly the float32 vector
    np.testing.assert_array_equal(got_vectors, vectors)
    assert len(set(map(tuple, codes[:, :1].tolist()))) == codes[:, 0].max() + 1


def test_checkpoints_and_state_dicts_unchanged_by_a_run(demo_hub, tmp_path):
    specs = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[5]])
    paths = [demo_hub / "models" / s.org / s.name / "rqvae_best.pt" for s in specs]
    before = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    states = [torch.load(p, weights_only=True)["model_state_dict"] for p in paths]
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    results = run_models(specs, RunOptions(hub=LocalHub(demo_hub), out_dir=str(tmp_path)), Quiet())
    assert all(r.ok for r in results), [r.error for r in results]
    assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths] == before
    reloaded = [torch.load(p, weights_only=True)["model_state_dict"] for p in paths]
    for copy, state, again in zip(copies, states, reloaded, strict=True):
        assert copy.keys() == state.keys() == again.keys()
        for key in copy:
            assert torch.equal(copy[key], state[key]) and torch.equal(copy[key], again[key])


@pytest.mark.parametrize(
    ("batch_size", "actors", "mode", "executor"),
    [
        (1, 1, PoolMode.AUTO, ExecutorMode.LOCAL),
        (7, 1, PoolMode.AUTO, ExecutorMode.LOCAL),
        (128, 1, PoolMode.AUTO, ExecutorMode.LOCAL),
        (64, 2, PoolMode.MODEL, ExecutorMode.RAY),
        (128, 2, PoolMode.DATASET, ExecutorMode.RAY),
        (4096, 1, PoolMode.AUTO, ExecutorMode.RAY),
        (300, None, PoolMode.AUTO, ExecutorMode.RAY),  # auto-sized, little work: Ray tasks, the stage kept between
    ],
)
def test_bytes_invariant_to_batch_size_actor_count_plan_and_executor(
    demo_run, demo_hub, local_ray, tmp_path, batch_size, actors, mode, executor
):
    out, _ = demo_run
    # Two NYC models share the actors of a packed pool; TKY runs beside them (not one row at a time: that is slow).
    models = [DEFAULT_MODELS[1], DEFAULT_MODELS[2]] + ([DEFAULT_MODELS[7]] if batch_size > 1 else [])
    specs = parse_model_ids(models)
    options = RunOptions(
        hub=LocalHub(demo_hub),
        out_dir=str(tmp_path),
        batch_size=batch_size,
        pools=PoolSizing(mode, actors, actors),
        executor=executor,
    )
    results = run_models(specs, options, Quiet())
    assert all(r.ok for r in results), [r.error for r in results]
    for spec in specs:
        assert output_path(tmp_path, spec).read_bytes() == output_path(out, spec).read_bytes()


def _parquet_hub(demo_hub, root, dense: bool):
    """The demo NYC dataset re-laid as Parquet shards (sparse ``indices`` or dense ``features``) plus one model."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from rqvae_ray.core.encoder import SparseRows
    from rqvae_ray.core.rows import sparse_table

    spec = SPECS[1]
    shutil.copytree(demo_hub / "models" / spec.org / spec.name, root / "models" / spec.org / spec.name)
    src, dst = demo_hub / "datasets/comp5331poi/nyc", root / "datasets/comp5331poi/nyc"
    (dst / "RQVAE Dataset/poi_features").mkdir(parents=True)
    shutil.copytree(src / "Intermediate Files", dst / "Intermediate Files")
    shutil.copy(src / "RQVAE Dataset/metadata.json", dst / "RQVAE Dataset/metadata.json")
    features = features_of(demo_hub, "nyc")
    for part, (lo, hi) in enumerate([(0, 1000), (1000, 3333), (3333, len(features))]):
        if dense:
            flat = pa.array(features[lo:hi].ravel())
            table = pa.table(
                {
                    "Pid": pa.array(np.arange(lo + 1, hi + 1, dtype=np.int64)),
                    "features": pa.FixedSizeListArray.from_arrays(flat, features.shape[1]),
                }
            )
        else:
            table = sparse_table(SparseRows.from_dense(features[lo:hi]), first_pid=lo + 1)
        pq.write_table(table, dst / f"RQVAE Dataset/poi_features/part-{part:05d}.parquet")
    return spec


@pytest.mark.parametrize("executor", [ExecutorMode.LOCAL, ExecutorMode.RAY])
@pytest.mark.parametrize("dense", [False, True], ids=["sparse-indices", "dense-features"])
def test_parquet_shards_give_the_same_bytes_as_the_pt_file(demo_run, demo_hub, local_ray, tmp_path, dense, executor):
    out, _ = demo_run
    spec = _parquet_hub(demo_hub, tmp_path / "hub", dense)
    options = RunOptions(
        hub=LocalHub(tmp_path / "hub"), out_dir=str(tmp_path / "out"), batch_size=500, executor=executor
    )
    results = run_models([spec], options, Quiet())
    assert results[0].ok, results[0].error
    assert output_path(tmp_path / "out", spec).read_bytes() == output_path(out, spec).read_bytes()


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
def test_parquet_shards_written_as_csv_reach_the_pool_in_blocks_of_a_few_batches(demo_hub, local_ray, tmp_path, fmt):
    """Ray Data would hand the pool each shard's rows in blocks of up to its block size of input (a few hundred thousand
    POIs with CSV's blocks); CSV output gets them cut into blocks of a few batches first, Parquet output keeps them."""
    from rqvae_ray.pipeline.jobs import load_dataset
    from rqvae_ray.ray_backend.cluster import ClusterShape, configure_data_context
    from rqvae_ray.ray_backend.executor import build_dataset
    from rqvae_ray.ray_backend.plan import plan_dataset, task_rows

    spec = _parquet_hub(demo_hub, tmp_path / "hub", dense=False)
    output = OutputSpec(fmt=fmt)
    options = RunOptions(hub=LocalHub(tmp_path / "hub"), out_dir=str(tmp_path / "out"), batch_size=500, output=output)
    loaded = load_dataset(spec.dataset_repo, [spec], options, Quiet())
    cluster = ClusterShape.current()
    configure_data_context()
    plan = plan_dataset([r.weights.nbytes for r in loaded.ready], loaded.features.num_pois, options.pools, cluster, 1)
    shown = repr(build_dataset(loaded, plan, options, cluster))
    cut = task_rows(True, fmt, 500)
    if fmt is OutputFormat.CSV:
        assert cut == 2000 and f"StreamingRepartition[num_rows_per_block={cut}," in shown, shown
    else:
        assert cut is None and "Repartition" not in shown, shown
    assert task_rows(False, OutputFormat.CSV, 500) is None  # rows in memory come in blocks of one batch or a few
