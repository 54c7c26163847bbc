"""Functional checks of the benchmark harness (``benchmarks/``): data generator, original replay, W2 baseline, sampler.

No timing is asserted anywhere: the figures come from ``python -m benchmarks w1|w2``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks import baseline, generate, original
from benchmarks.ceiling import Ceiling, Pair, disk_write_seconds, output_bytes
from benchmarks.compare import compare_files, output_file, product_csv_bytes, read_codes
from benchmarks.measure import (
    DRIVER,
    ENCODERS,
    IDLE_WORKERS,
    OTHER_WORKERS,
    RAY_OWN,
    READS,
    SPILLING,
    WRITER,
    Measurement,
    process_role,
    run_measured,
)
from benchmarks.stand_in import stand_in
from rqvae_ray.core.checkpoint import load_checkpoint_file
from rqvae_ray.core.encoder import Encoder, codeword_sums
from rqvae_ray.core.formatting import CSV_HEADER
from rqvae_ray.core.rows import rows_from_table
from rqvae_ray.inputs.demo import build_features
from rqvae_ray.inputs.features import load_features
from rqvae_ray.inputs.model_ids import parse_model_ids
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models

N = 3000
SHARD_ROWS = 1200
MODEL = generate.NYC_MODELS[0]
REPO_DIR = "datasets/comp5331poi/nyc"


def _quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def synthetic_hub(tmp_path_factory):
    """N synthetic POIs in 3 Parquet shards, the dense .pt copy (for the original replay) and one fitted model."""
    hub = tmp_path_factory.mktemp("bench") / "hub"
    return generate.generate_hub(hub, N, pt=True, shard_rows=SHARD_ROWS, models=(MODEL,), fit_rows=N, progress=_quiet)


def _shards(hub):
    return sorted((hub / REPO_DIR / generate.FEATURES_DIR).glob("*.parquet"))


def _product_codes(hub, model_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Codes and vectors of the product's encoder over all shards, in Pid order."""
    weights = load_checkpoint_file(hub / "models" / model_id / "rqvae_best.pt")
    table = pa.concat_tables(pq.read_table(path) for path in _shards(hub))
    return Encoder(weights).encode(rows_from_table(table))


def test_generator_writes_a_valid_sharded_hub(synthetic_hub):
    shards = _shards(synthetic_hub)
    assert [p.name for p in shards] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    tables = [pq.read_table(path) for path in shards]
    assert [t.num_rows for t in tables] == [1200, 1200, 600]
    for table in tables:
        assert table.schema == pa.schema([("Pid", pa.int64()), ("indices", pa.list_(pa.int32()))])
    table = pa.concat_tables(tables)
    assert table.column("Pid").to_numpy().tolist() == list(range(1, N + 1))

    indices = table.column("indices").combine_chunks()
    offsets = indices.offsets.to_numpy()
    flat = indices.flatten().to_numpy()
    counts = np.diff(offsets)
    assert counts.min() >= 3 and counts.max() <= 22
    assert 10 < counts.mean() < 20  # the real NYC rows average about 15 nonzeros
    assert flat.min() >= 0 and flat.max() < generate.TOTAL_DIM
    for start, stop in zip(offsets[:-1], offsets[1:], strict=True):
        row = flat[start:stop]
        assert (np.diff(row) > 0).all(), "column indices must be strictly ascending"
        assert ((row >= 0) & (row < 209)).sum() == 1  # one category
        assert ((row >= 209) & (row < 300)).sum() == 1  # one region
        assert 1 <= ((row >= 300) & (row < 324)).sum() <= 10  # hours
        assert (row >= 324).sum() <= 10  # users

    meta = json.loads((synthetic_hub / REPO_DIR / "RQVAE Dataset/metadata.json").read_text())
    _, demo_meta = build_features([1], [1], [[0]], [[1]], {"categories": 209, "regions": 91, "users": 1083})
    assert meta == {**demo_meta, "num_pois": N}
    assert meta["total_dim"] == 1407

    with (synthetic_hub / REPO_DIR / "Intermediate Files/pid_mapping.csv").open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["Original_Pid", "Mapped_Pid"]
        rows = list(reader)
    assert [int(r["Mapped_Pid"]) for r in rows] == list(range(1, N + 1))
    assert len({r["Original_Pid"] for r in rows}) == N

    # The .pt copy holds the same rows, densified.
    import torch

    dense = torch.load(synthetic_hub / REPO_DIR / "RQVAE Dataset/poi_features.pt").numpy()
    assert dense.shape == (N, 1407)
    np.testing.assert_array_equal(dense, generate.densify(offsets, flat))

    # The product accepts the dataset and the model.
    features = load_features(LocalHub(synthetic_hub).dataset_files("comp5331poi", "nyc"))
    assert (features.num_pois, features.dim) == (N, 1407)
    assert load_checkpoint_file(synthetic_hub / "models" / MODEL / "rqvae_best.pt").input_dim == 1407


def test_generator_dense_variant_holds_the_same_rows(tmp_path, synthetic_hub):
    hub = generate.generate_hub(
        tmp_path / "dense", SHARD_ROWS, dense=True, shard_rows=SHARD_ROWS, models=(), progress=_quiet
    )
    (shard,) = _shards(hub)
    table = pq.read_table(shard)
    assert table.schema == pa.schema([("Pid", pa.int64()), ("features", pa.list_(pa.float32(), 1407))])
    sparse = pq.read_table(_shards(synthetic_hub)[0])  # same seed and shard size: the same rows
    a, b = rows_from_table(table), rows_from_table(sparse)
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.values is None


def test_original_replay_writes_the_original_csv(tmp_path, synthetic_hub):
    path, rows = original.process_model(MODEL, synthetic_hub, tmp_path)
    assert path == output_file(tmp_path, MODEL) and rows == N
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["Pid", "Codebook", "Vector"]
        body = list(reader)
    assert [int(r[0]) for r in body] == list(range(1, N + 1))
    first_codes, first_vector = json.loads(body[0][1]), json.loads(body[0][2])
    assert len(first_codes) == 3 and all(0 <= c < 32 for c in first_codes)
    assert len(first_vector) == 64

    pids, codes = read_codes(path)
    product, _ = _product_codes(synthetic_hub, MODEL)
    assert pids.tolist() == list(range(1, N + 1))
    # float32 (original) against float64 (product): only exact near-ties may differ.
    assert (codes == product).all(axis=1).mean() >= 0.999


def test_baseline_matches_the_product_encoder(tmp_path, synthetic_hub):
    (csv_path,) = baseline.run(synthetic_hub, tmp_path, [MODEL], "csv", batch_rows=1000, threads=1)
    (parquet_path,) = baseline.run(synthetic_hub, tmp_path, [MODEL], "parquet", batch_rows=1000, threads=1)
    codes, vectors = _product_codes(synthetic_hub, MODEL)
    pids, csv_codes = read_codes(csv_path)
    assert pids.tolist() == list(range(1, N + 1))
    assert (csv_codes == codes).all(axis=1).mean() >= 0.999
    np.testing.assert_array_equal(read_codes(parquet_path)[1], csv_codes)
    table = pq.read_table(parquet_path)
    assert table.column_names == ["Pid", "Codebook", "Vector"]
    assert table.schema.field("Vector").type == pa.list_(pa.float32(), 64)
    if (csv_codes == codes).all():
        # Same codes: the product's CSV lines, byte for byte (Vector = sum of the float32 codewords).
        expected = CSV_HEADER + product_csv_bytes(np.arange(1, N + 1), codes, vectors)
        assert csv_path.read_bytes() == expected
    comparison = compare_files(MODEL, csv_path, parquet_path)
    assert comparison.rows == N and comparison.equal_rows == N and comparison.pids_equal


def test_sampler_sums_the_process_tree(tmp_path):
    child = (
        "import subprocess, sys, time\n"
        "grand = subprocess.Popen([sys.executable, '-c', 'b = b\\'x\\' * (96 << 20); import time; time.sleep(1.5)'])\n"
        "a = b'x' * (64 << 20)\n"
        "print('child up', flush=True)\n"
        "grand.wait()\n"
    )
    measurement = run_measured([sys.executable, "-c", child], poll_s=0.1, pss_every=1)
    assert measurement.returncode == 0
    assert [line for _, line in measurement.lines] == ["child up"]
    assert measurement.peak_processes >= 2
    assert measurement.peak_rss >= (64 + 96) << 20
    assert measurement.peak_pss is None or measurement.peak_pss >= (64 + 96) << 20
    assert len(measurement.peak_breakdown) >= 2


def test_read_codes_ignores_a_dedup_extra_code(tmp_path):
    path = tmp_path / "codebooks-x.csv"
    path.write_text('Pid,Codebook,Vector\n1,"[1, 2, 3]","[0.5]"\n2,"[1, 2, 3, 0]","[0.5]"\n3,"[4, 5, 6, 1]","[-0.0]"\n')
    pids, codes = read_codes(path)
    assert pids.tolist() == [1, 2, 3]
    assert codes.tolist() == [[1, 2, 3], [1, 2, 3], [4, 5, 6]]
    table = pa.table(
        {"Pid": pa.array([1, 2], pa.int64()), "Codebook": pa.array([[7, 8, 9], [7, 8, 9, 0]], pa.list_(pa.int32()))}
    )
    pq.write_table(table, tmp_path / "codebooks-x.parquet")
    assert read_codes(tmp_path / "codebooks-x.parquet")[1].tolist() == [[7, 8, 9], [7, 8, 9]]


def test_stand_in_gives_equal_rows_equal_sids_and_the_real_vectors(synthetic_hub):
    weights = load_checkpoint_file(synthetic_hub / "models" / MODEL / "rqvae_best.pt")
    table = pa.concat_tables(pq.read_table(path) for path in _shards(synthetic_hub))
    rows = rows_from_table(table)
    encoder = stand_in(weights)
    codes, vectors = encoder.encode(rows)
    assert codes.dtype == np.int32 and codes.shape == (N, len(weights.codebooks))
    assert (codes >= 0).all() and (codes < np.array(weights.codebook_sizes)).all()
    assert vectors.dtype == np.float32 and np.array_equal(vectors, codeword_sums(weights.codebooks, codes))
    assert np.array_equal(stand_in(weights).encode(rows)[0], codes)  # a function of the rows and the model
    again = rows_from_table(pa.concat_tables([table.slice(10, 1), table.slice(10, 1)]))
    first, second = encoder.encode(again)[0]
    assert np.array_equal(first, codes[10]) and np.array_equal(second, codes[10])
    assert len(np.unique(codes, axis=0)) > 0.9 * N  # 3,000 rows over 32,768 SIDs: few collide, as with real models


def test_stand_in_writes_the_same_bytes_through_both_executors(synthetic_hub, local_ray, tmp_path):
    for executor in (ExecutorMode.LOCAL, ExecutorMode.RAY):
        options = RunOptions(
            hub=LocalHub(synthetic_hub),
            out_dir=str(tmp_path / executor.value),
            executor=executor,
            batch_size=1000,
            encoder_factory=stand_in,
        )
        [result] = run_models(parse_model_ids([MODEL]), options, Progress(lambda _: None))
        assert result.ok and result.rows == N, result.error
    local, ray = tmp_path / "local", tmp_path / "ray"
    [published] = [p.relative_to(local) for p in local.rglob("codebooks-*.csv")]
    assert (local / published).read_bytes() == (ray / published).read_bytes()
    assert output_bytes(local) == (local / published).stat().st_size


@pytest.mark.parametrize(
    ("cmdline", "is_root", "role"),
    [
        (["/venv/bin/python", "-m", "benchmarks.stand_in"], True, DRIVER),
        (["ray::WriterActor.write"], False, WRITER),
        (["ray::WriterActor"], False, WRITER),
        (["ray::MapWorker(MapBatches(EncodeModels))"], False, ENCODERS),
        (["ray::MapBatches(encode_in_task)"], False, ENCODERS),
        (["ray::ReadPoi->SplitBlocks(2)"], False, READS),
        (["ray::IDLE"], False, IDLE_WORKERS),
        (["ray::IDLE_SpillWorker"], False, SPILLING),
        (
            ["/venv/bin/python", "/venv/.../ray/_private/workers/default_worker.py", "--node-ip-address=1"],
            False,
            IDLE_WORKERS,
        ),
        (["ray::_StatsActor"], False, OTHER_WORKERS),
        (["/venv/.../ray/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/ray"], False, RAY_OWN),
        (["/venv/.../ray/core/src/ray/raylet/raylet", "--raylet_socket_name=x"], False, RAY_OWN),
        ([], False, RAY_OWN),
    ],
)
def test_process_role_from_the_command_line(cmdline, is_root, role):
    assert process_role(cmdline, is_root) == role


def test_sampler_keeps_the_cpu_seconds_of_the_driver():
    busy = "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass\n"
    measurement = run_measured([sys.executable, "-c", busy], poll_s=0.05)
    assert measurement.returncode == 0
    assert measurement.cpu_by_role[DRIVER] >= 0.4


def _measurement(wall_s: float, cpu: dict[str, float]) -> Measurement:
    return Measurement(
        command=[], returncode=0, wall_s=wall_s, peak_rss=0, peak_pss=None, peak_processes=1, cpu_by_role=cpu
    )


def test_ceiling_figures_come_from_the_difference_of_the_two_sizes(tmp_path):
    system = Ceiling("ray", "csv", (1000, 3000), models=5)
    system.pairs = [
        Pair(_measurement(10.0, {DRIVER: 2.0}), _measurement(14.0, {DRIVER: 3.0, WRITER: 1.0}), 4_000_000, 1.0, 1.5),
        Pair(_measurement(11.0, {DRIVER: 2.0}), _measurement(16.0, {DRIVER: 4.0}), 4_000_000, 3.0, 2.0),
    ]
    assert system.added_sid_rows == 10_000
    assert system.added_wall_s == 4.5 and system.disk_s == 1.5 and system.ratio == 3.0
    assert system.rows_per_s == 10_000 / 4.5
    assert system.cpu() == {DRIVER: (3.5, 1e6 * 1.5 / 10_000), WRITER: (0.5, 1e6 * 0.5 / 10_000)}
    assert system.cached_ratio == 4.5 / 1.75
    assert "streaming/disk 3.00x (the disk through the page cache: 2.57x)" in system.report()[0]
    for direct in (True, False):
        seconds = disk_write_seconds(tmp_path / "probe", (3 << 20) + 5, direct=direct)
        assert seconds > 0 and list((tmp_path / "probe").iterdir()) == []


def test_job_floor_is_the_encoders_share_plus_the_floor_of_ray_data(synthetic_hub):
    from benchmarks.__main__ import JobFloor, SystemResult

    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.job_floor", "--hub-dir", str(synthetic_hub), "--rows", "1000"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rate = json.loads(proc.stdout.splitlines()[-1])
    assert rate["sid_rows"] == 1000 and 0 < rate["cpu_s_per_sid_row"] < 1e-3
    ray_data = SystemResult("W2", "floor", 0, 0, 0, runs=[_measurement(w, {}) for w in (6.0, 5.0, 9.0)])
    floor = JobFloor(sid_rows=4_000_000, cpu_s_per_sid_row=5e-6, cores=2, ray_data=ray_data)
    assert floor.ok and floor.encode_s == 10.0 and floor.wall_s == 16.0
    assert "4,000,000 SID rows x 5.00 us / 2 cores + Ray Data's floor 6.0s" in floor.describe()
    assert not JobFloor(4_000_000, None, 2, ray_data).ok
