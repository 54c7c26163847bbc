"""--dedup and --sid-tokens: checked against an independent straightforward dedup of the plain output."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.core.sid_stats import SidCounter, pack_codes
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.inputs.stores import LocalHub
from rqvae_ray.pipeline.options import ExecutorMode, PoolMode, PoolSizing, RunOptions
from rqvae_ray.pipeline.progress import Quiet
from rqvae_ray.runner import run_models
from tests.writing import csv_name

SPECS = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[8]])
LETTERS = "abcd"


def _folder(out: Path, spec) -> Path:
    return out / "datasets" / spec.org / spec.dataset / "LLM Dataset" / "Intermediate Files"


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as handle:
        return list(csv.reader(handle))


def expected_dedup(codes: list[list[int]]) -> list[list[int]]:
    """The GNPR-SID rule, written plainly: shared SIDs get 0, 1, 2, ... in ascending Pid order."""
    counts = Counter(map(tuple, codes))
    seen: dict[tuple, int] = defaultdict(int)
    result = []
    for code in codes:
        key = tuple(code)
        if counts[key] > 1:
            result.append([*code, seen[key]])
            seen[key] += 1
        else:
            result.append(list(code))
    return result


def _run(hub, out, output: OutputSpec, **kwargs):
    options = RunOptions(hub=LocalHub(hub), out_dir=str(out), output=output, **kwargs)
    results = run_models(SPECS, options, Quiet())
    assert all(r.ok for r in results), [r.error for r in results]
    return results


RAY = ExecutorMode.RAY


@pytest.fixture(scope="module")
def dedup_runs(demo_hub, demo_run, local_ray, tmp_path_factory):
    runs = {}
    both = OutputSpec(dedup=True, sid_tokens=True)
    for name, output, kwargs in (
        ("csv", both, {"batch_size": 4096}),
        ("csv_small_batches", both, {"batch_size": 7}),
        ("csv_model_pools", both, {"batch_size": 300, "pools": PoolSizing(PoolMode.MODEL), "executor": RAY}),
        ("parquet", OutputSpec(OutputFormat.PARQUET, dedup=True, sid_tokens=True), {}),
        ("tokens_only", OutputSpec(sid_tokens=True), {}),
    ):
        out = tmp_path_factory.mktemp(name)
        _run(demo_hub, out, output, **kwargs)
        runs[name] = out
    return runs


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dedup_matches_independent_rule(dedup_runs, demo_run, spec):
    plain = _rows(_folder(demo_run[0], spec) / csv_name(spec))
    deduped = _rows(_folder(dedup_runs["csv"], spec) / csv_name(spec))
    assert deduped[0] == ["Pid", "Codebook", "Vector", "SID"]
    codes = [json.loads(r[1]) for r in plain[1:]]
    want = expected_dedup(codes)
    got = [json.loads(r[1]) for r in deduped[1:]]
    assert got == want
    assert any(len(c) == 4 for c in got), "the demo models do have shared SIDs"
    assert len({tuple(c) for c in got}) == len(got)  # every POI now has a distinct code
    for plain_row, row, code in zip(plain[1:], deduped[1:], want, strict=True):
        assert row[0] == plain_row[0] and row[2] == plain_row[2]
        assert row[3] == "".join(f"<{LETTERS[i]}_{c}>" for i, c in enumerate(code))


def test_dedup_is_batch_actor_and_plan_invariant(dedup_runs):
    for spec in SPECS:
        name = csv_name(spec)
        a = (_folder(dedup_runs["csv"], spec) / name).read_bytes()
        assert a == (_folder(dedup_runs["csv_small_batches"], spec) / name).read_bytes()
        assert a == (_folder(dedup_runs["csv_model_pools"], spec) / name).read_bytes()


def test_parquet_dedup_equals_csv(dedup_runs):
    for spec in SPECS:
        table = pq.read_table(_folder(dedup_runs["parquet"], spec) / f"codebooks-{spec.name}.parquet")
        rows = _rows(_folder(dedup_runs["csv"], spec) / csv_name(spec))[1:]
        assert table.column_names == ["Pid", "Codebook", "Vector", "SID"]
        assert table.column("Pid").to_pylist() == [int(r[0]) for r in rows]
        assert table.column("Codebook").to_pylist() == [json.loads(r[1]) for r in rows]
        assert table.column("SID").to_pylist() == [r[3] for r in rows]
        vectors = np.array(table.column("Vector").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(vectors, np.array([json.loads(r[2]) for r in rows], dtype=np.float32))


def test_tokens_without_dedup_keep_codes(dedup_runs, demo_run):
    for spec in SPECS:
        plain = _rows(_folder(demo_run[0], spec) / csv_name(spec))
        rows = _rows(_folder(dedup_runs["tokens_only"], spec) / csv_name(spec))
        assert [r[:3] for r in rows[1:]] == plain[1:]
        assert all(r[3].count("<") == 3 for r in rows[1:])


def test_dedup_codes_streaming_equals_rule():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 3, size=(500, 3))
    sizes = (3, 3, 3)
    counter = SidCounter(sizes)
    packed = pack_codes(codes, sizes)
    counter.add(packed)
    extra = np.concatenate([counter.dedup_codes(packed[i : i + 37]) for i in range(0, 500, 37)])
    want = expected_dedup(codes.tolist())
    got = [list(c) + ([int(e)] if e >= 0 else []) for c, e in zip(codes.tolist(), extra, strict=True)]
    assert got == want
