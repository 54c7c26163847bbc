"""SIDs of codebooks whose sizes multiply past 2**63 (8 x 256, 7 x 1,000): packed in several int64 words, and exact
in every format, dedup rule, export, resumed file, kept file and diff, against the reference encoder; a model of
narrow SIDs beside them keeps its single-word packing."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from rqvae_ray.api.model import load_model
from rqvae_ray.cli.diff import app as diff_app
from rqvae_ray.cli.diff import diff_codebooks
from rqvae_ray.core import sid_stats
from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.formatting import CSV_HEADER_WITH_SID, arrow_columns, csv_lines, csv_parts, string_bytes
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.core.sid_stats import SidCounter, pack_codes, sid_array, sid_layout, unpack_codes
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.existing_rows import ExistingRows
from rqvae_ray.outputs.layout import output_dir
from rqvae_ray.outputs.manifest import Provenance
from rqvae_ray.outputs.readers import read_codebooks
from rqvae_ray.outputs.resume import ResumeState, journal_path
from rqvae_ray.outputs.targets import ModelTarget
from tests.reference import reference_sids
from tests.sid_rules import assert_exports_match, dedup_rule, extended_rule
from tests.writing import dataset_writer, encode_stage

REPO = "org/nyc"
N = 300  # POIs; rows from 240 on repeat earlier ones, so that SIDs collide
DIM, HIDDEN, LATENT = 48, 32, 16
SIZES = {
    "org/rqvae-nyc-w8x256": (256,) * 8,
    "org/rqvae-nyc-w7x1000": (1000,) * 7,
    "org/rqvae-nyc-narrow": (8, 8, 8),
}
EXPORTS = frozenset({Export.INDEX_JSON, Export.TENSOR})


def _state(sizes: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """A published-layout state dict: Linear, BatchNorm, projection and residual codebooks of ``sizes``."""
    rng = np.random.default_rng(seed)
    state = {
        "encoder.layers.0.weight": rng.standard_normal((HIDDEN, DIM)) / math.sqrt(DIM),
        "encoder.layers.0.bias": rng.standard_normal(HIDDEN) * 0.1,
        "encoder.layers.1.weight": 1 + 0.1 * rng.standard_normal(HIDDEN),
        "encoder.layers.1.bias": 0.1 * rng.standard_normal(HIDDEN),
        "encoder.layers.1.running_mean": 0.1 * rng.standard_normal(HIDDEN),
        "encoder.layers.1.running_var": rng.uniform(0.5, 2.0, HIDDEN),
        "encoder.proj.weight": rng.standard_normal((LATENT, HIDDEN)) / math.sqrt(HIDDEN),
        "encoder.proj.bias": 0.1 * rng.standard_normal(LATENT),
    }
    for level, size in enumerate(sizes):
        state[f"quantizer.quantizers.{level}.vectors.weight"] = rng.standard_normal((size, LATENT)) * 0.7**level
    return {key: torch.from_numpy(np.asarray(value, dtype=np.float32)) for key, value in state.items()}


def _features() -> np.ndarray:
    rng = np.random.default_rng(7)
    features = np.zeros((N, DIM), dtype=np.float32)
    for row in range(N):
        features[row, rng.choice(DIM, size=rng.integers(1, 6), replace=False)] = 1.0
    features[240:] = features[rng.integers(0, 240, size=N - 240)]
    return features


@dataclasses.dataclass(frozen=True)
class Case:
    features: np.ndarray
    models: list[tuple[str, object]]  # (model ID, ModelWeights)
    codes: dict[str, np.ndarray]  # the reference encoder's codes per model
    vectors: dict[str, np.ndarray]  # load_model(...).encode's vectors per model


@pytest.fixture(scope="module")
def case() -> Case:
    features = _features()
    models, codes, vectors = [], {}, {}
    for seed, (model_id, sizes) in enumerate(SIZES.items()):
        state = _state(sizes, seed)
        buffer = io.BytesIO()
        torch.save({"model_state_dict": state}, buffer)
        model = load_model(buffer.getvalue())
        assert model.codebook_sizes == sizes
        got, vectors[model_id] = model.encode(features)
        codes[model_id] = reference_sids(state, features)[0]
        np.testing.assert_array_equal(got, codes[model_id])
        models.append((model_id, model.weights))
    return Case(features, models, codes, vectors)


def _targets(case: Case, fmt: OutputFormat, **changes) -> list[ModelTarget]:
    return [
        ModelTarget(
            model_id=model_id,
            slot=slot,
            filename=f"codebooks-{model_id.split('/')[1]}.{fmt.value}",
            codebook_sizes=weights.codebook_sizes,
            provenance=Provenance("c", "r", "f", "r"),
            codebooks=weights.codebooks,
            **{name: value(slot) for name, value in changes.items()},
        )
        for slot, (model_id, weights) in enumerate(case.models)
    ]


def _blocks(case: Case, spec: OutputSpec, first_pid: int = 1, rows: int = 70) -> list[pa.Table]:
    """Encoded blocks of Pids ``first_pid``..N, as the encode stage makes them."""
    stage = encode_stage(REPO, [(model_id, slot, w) for slot, (model_id, w) in enumerate(case.models)], spec)
    return [
        stage(sparse_table(SparseRows.from_dense(case.features[start : start + rows]), first_pid=start + 1))
        for start in range(first_pid - 1, N, rows)
    ]


def _write(case: Case, out: Path, spec: OutputSpec, targets: list[ModelTarget] | None = None, first_pid: int = 1):
    writer = dataset_writer(REPO, targets or _targets(case, spec.fmt), str(out), spec, N, first_pid)
    for block in _blocks(case, spec, first_pid):
        writer.write(block)
    return writer


def _folder(out: Path) -> Path:
    return output_dir(out, REPO, "LLM Dataset")


def _codebooks(path: str | Path) -> list[list[int]]:
    return [list(code) for code in read_codebooks(path)["Codebook"]]


def _plain_stats(codes: list[list[int]]) -> dict:
    """The SID figures of the manifest, counted plainly."""
    counts = Counter(map(tuple, codes))
    shared = {}
    for length in range(1, len(codes[0]) + 1):
        prefixes = Counter(tuple(code[:length]) for code in codes)
        shared[str(length)] = sum(count for count in prefixes.values() if count > 1)
    return {
        "pois": len(codes),
        "unique_sids": len(counts),
        "collided_buckets": sum(count > 1 for count in counts.values()),
        "largest_bucket": max(counts.values()),
        "pois_in_collided_buckets": sum(count for count in counts.values() if count > 1),
        "pois_sharing_prefix": shared,
        "bucket_size_histogram": {str(k): v for k, v in sorted(Counter(counts.values()).items())},
    }


@pytest.mark.parametrize(
    "sizes",
    [(256,) * 8, (1000,) * 7, (2**31, 2**32), (2**31, 2**32, 2), (3, 2**62, 5), (1, 2**63, 1, 3), (7, 3, 1)],
    ids=["8x256", "7x1000", "exactly-2^63", "2^64", "2^62-inside", "a-level-of-2^63", "narrow"],
)
def test_packing_is_exact_and_in_code_order_for_any_sizes(sizes):
    layout = sid_layout(sizes)
    assert layout.wide == (math.prod(sizes) > 2**63)
    rng = np.random.default_rng(0)
    highest = np.array([size - 1 for size in sizes], dtype=np.int64)
    random = (rng.random((200, len(sizes))) * highest).astype(np.int64)
    codes = np.vstack([random, random[:20], np.zeros(len(sizes), dtype=np.int64), highest, highest - (highest > 0)])
    packed = pack_codes(codes, sizes)
    np.testing.assert_array_equal(unpack_codes(packed, sizes), codes)
    # Packed SIDs sort as the codes do, and are equal exactly where the codes are.
    np.testing.assert_array_equal(np.argsort(packed, kind="stable"), np.lexsort(codes.T[::-1]))
    assert len(np.unique(packed)) == len({tuple(code) for code in codes.tolist()})
    assert layout.in_range(packed)
    column = pa.chunked_array([sid_array(packed[:5]), sid_array(packed[5:])]).slice(3)
    np.testing.assert_array_equal(unpack_codes(layout.from_arrow(column), sizes), codes[3:])
    negative = layout.words_of(packed[:1]).copy()
    negative[0, -1] = -1
    assert not layout.in_range(layout.from_words(negative))
    if layout.word_max[0] < np.iinfo(np.int64).max:
        past = layout.words_of(packed[:1]).copy()
        past[0, 0] = layout.word_max[0] + 1
        assert not layout.in_range(layout.from_words(past))


def test_narrow_sids_keep_their_single_int64():
    packed = pack_codes(np.array([[1, 2, 3], [3, 4, 5]]), (4, 5, 6))
    assert packed.dtype == np.int64 and packed.tolist() == [1 * 30 + 2 * 6 + 3, 3 * 30 + 4 * 6 + 5]
    assert sid_array(packed).type == pa.int64()
    wide = pack_codes(np.array([[1] * 8]), (256,) * 8)
    assert sid_array(wide).type == pa.list_(pa.int64(), 2)
    assert sid_layout((256,) * 8).words_of(wide).tolist() == [[sum(256**k for k in range(7)), 1]]


def test_counting_wide_sids_in_batches_follows_the_plain_rules(case):
    for model_id, sizes in SIZES.items():
        codes = case.codes[model_id]
        counter = SidCounter(sizes)
        for start in range(0, N, 37):
            counter.add(pack_codes(codes[start : start + 37], sizes))
        summary = counter.summary()
        assert {k: summary[k] for k in _plain_stats(codes.tolist())} == _plain_stats(codes.tolist())
        for level, size in enumerate(sizes):
            assert summary["levels"][level]["usage"] == np.bincount(codes[:, level], minlength=size).tolist()
        extra = np.concatenate([counter.dedup_codes(pack_codes(codes[s : s + 37], sizes)) for s in range(0, N, 37)])
        got = [[*code, int(e)] if e >= 0 else code for code, e in zip(codes.tolist(), extra, strict=True)]
        assert got == dedup_rule(codes.tolist())


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
@pytest.mark.parametrize(
    ("dedup", "fixed"), [(False, False), (True, False), (True, True)], ids=["plain", "dedup", "fixed"]
)
def test_every_format_and_export_holds_the_reference_sids(tmp_path, case, fmt, dedup, fixed):
    spec = OutputSpec(fmt, dedup=dedup, fixed_length=fixed, sid_tokens=True, exports=EXPORTS)
    published = _write(case, tmp_path, spec).finish()
    assert [p.entry.model_id for p in published] == list(SIZES)  # the narrow model is not taken down
    pids = np.arange(1, N + 1)
    for item in published:
        model_id = item.entry.model_id
        codes = case.codes[model_id]
        want = dedup_rule(codes.tolist(), fixed) if dedup else codes.tolist()
        frame = read_codebooks(item.path)
        assert [list(code) for code in frame["Codebook"]] == want
        np.testing.assert_array_equal(np.stack(frame["Vector"].to_list()), case.vectors[model_id])
        assert frame["SID"].tolist() == ["".join(f"<{'abcdefghi'[i]}_{c}>" for i, c in enumerate(w)) for w in want]
        if fmt is OutputFormat.CSV and not dedup:
            parts = csv_parts(pids, codes, case.vectors[model_id], True)
            assert Path(item.path).read_bytes() == CSV_HEADER_WITH_SID + string_bytes(csv_lines(parts))
        assert_exports_match(_folder(tmp_path), item.entry.file, len(SIZES[model_id]), dedup, {"index-json", "tensor"})
        stats = item.entry.sid_stats
        assert {k: stats[k] for k in _plain_stats(codes.tolist())} == _plain_stats(codes.tolist())
    if dedup and not fixed:  # the repeated rows share SIDs: some POIs carry dedup codes, others none
        assert {len(code) for code in _codebooks(published[1].path)} == {7, 8}


def _resumable(case: Case, fmt: OutputFormat, resume_rows: int = 0) -> list[ModelTarget]:
    return _targets(case, fmt, resume_key=lambda slot: f"key-{slot}", resume_rows=lambda slot: resume_rows)


def _interrupt(case: Case, out: Path, spec: OutputSpec) -> None:
    """A run killed after 140 rows were made safe on disk and 70 more written."""
    writer = dataset_writer(REPO, _resumable(case, spec.fmt), str(out), spec, N)
    blocks = _blocks(case, spec)
    for block in blocks[:2]:
        writer.write(block)
    writer.checkpoint()
    writer.write(blocks[2])
    del writer


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
def test_an_interrupted_file_of_wide_sids_resumes_to_the_same_bytes(tmp_path, case, fmt):
    spec = OutputSpec(fmt, dedup=True, sid_tokens=True, exports=EXPORTS)
    whole = _write(case, tmp_path / "whole", spec).finish()
    out = tmp_path / "interrupted"
    _interrupt(case, out, spec)
    for target in _targets(case, fmt):
        assert ResumeState.read(_folder(out) / target.filename).rows == 140
        layout = sid_layout(target.codebook_sizes)
        safe = layout.words_of(pack_codes(case.codes[target.model_id][:140], target.codebook_sizes))
        header = b"rqsidwds" + np.int64(layout.words).tobytes() if layout.wide else b""  # narrow: as before
        held = journal_path(_folder(out) / target.filename).read_bytes()
        assert held[: len(header) + safe.nbytes] == header + safe.astype("<i8").tobytes()
    resumed = _write(case, out, spec, _resumable(case, fmt, 140), first_pid=141).finish()
    for want, got in zip(whole, resumed, strict=True):
        assert Path(got.path).read_bytes() == Path(want.path).read_bytes()
        assert got.entry.sha256 == want.entry.sha256 and got.entry.sid_stats == want.entry.sid_stats
        assert [e.sha256 for e in got.entry.exports] == [e.sha256 for e in want.entry.exports]
        assert _codebooks(got.path) == dedup_rule(case.codes[got.entry.model_id].tolist())


def test_a_journal_of_one_word_rows_is_never_read_as_wide_sids(tmp_path, case):
    """A journal of the same resume key written with one int64 per row (as before wide SIDs were packed in words) is
    refused, and its resume state dropped, rather than replayed as other SIDs."""
    spec = OutputSpec(OutputFormat.CSV)
    _interrupt(case, tmp_path, spec)
    target = _targets(case, spec.fmt)[1]
    journal = journal_path(_folder(tmp_path) / target.filename)
    with journal.open("r+b") as handle:  # in place, so that the resume state's inode still matches
        handle.write(np.arange(420, dtype="<i8").tobytes())  # as many bytes as 210 rows of two words
        handle.truncate(420 * 8)
    assert ResumeState.read(_folder(tmp_path) / target.filename).rows == 140
    with pytest.raises(OutputError, match="resume journal does not hold the 140 SIDs of 2 word"):
        dataset_writer(REPO, _resumable(case, spec.fmt, 140), str(tmp_path), spec, N, 141)
    assert not journal.exists()
    assert ResumeState.read(_folder(tmp_path) / target.filename) is None


def test_a_file_of_wide_sids_keeps_and_verifies_the_rows_of_an_existing_one(tmp_path, case):
    spec = OutputSpec(OutputFormat.PARQUET, dedup=True)
    first = _write(case, tmp_path / "first", spec).finish()
    kept = 250  # the repeated rows collide across the kept and the new rows
    existing = [ExistingRows(p.path, kept, p.entry.sha256, verify=slot == 1) for slot, p in enumerate(first)]
    targets = _targets(case, spec.fmt, existing=lambda slot: existing[slot])
    published = _write(case, tmp_path / "next", spec, targets, first_pid=1).finish()
    for old, new in zip(first, published, strict=True):
        codes = case.codes[new.entry.model_id].tolist()
        assert _codebooks(new.path) == extended_rule(_codebooks(old.path)[:kept], codes[kept:])
        assert new.entry.sid_stats == old.entry.sid_stats


def _plain_diff(a: list[list[int]], b: list[list[int]]) -> dict:
    """The diff's figures for Pids 1..n, counted plainly (an SID is a Codebook without its dedup code)."""
    width = max(len(code) for code in a + b)
    first_differs = [0] * width
    for code_a, code_b in zip(a, b, strict=True):
        padded = [code + [None] * (width - len(code)) for code in (code_a, code_b)]
        differ = [level for level in range(width) if padded[0][level] != padded[1][level]]
        if differ:
            first_differs[differ[0]] += 1

    def side(lists: list[list[int]]) -> tuple[list[tuple], dict]:
        levels = min(len(code) for code in lists)
        sids = [tuple(code[:levels]) for code in lists]
        counts = Counter(sids)
        return sids, {
            "sid_levels": levels,
            "dedup_codes": sum(len(code) > levels for code in lists),
            "unique_sids": len(counts),
            "collided_sids": sum(count > 1 for count in counts.values()),
            "pois_in_collisions": sum(count for count in counts.values() if count > 1),
        }

    (sids_a, figures_a), (sids_b, figures_b) = side(a), side(b)
    members_a, members_b = defaultdict(set), defaultdict(set)
    for pid, (sid_a, sid_b) in enumerate(zip(sids_a, sids_b, strict=True), start=1):
        members_a[sid_a].add(pid)
        members_b[sid_b].add(pid)
    moved = [pid for pid in range(1, len(a) + 1) if members_a[sids_a[pid - 1]] != members_b[sids_b[pid - 1]]]
    return {
        "pois": len(a),
        "sid_differs": sum(first_differs),
        "first_differs_at_level": first_differs,
        "a": figures_a,
        "b": figures_b,
        "moved_pois": len(moved),
        "moved_pids": moved[:10],
    }


def test_diff_of_wide_sids_counts_as_the_plain_reference(tmp_path, case):
    spec = OutputSpec(OutputFormat.CSV, dedup=True)
    published = {p.entry.model_id: p for p in _write(case, tmp_path, spec).finish()}
    model_id = "org/rqvae-nyc-w7x1000"
    a = published[model_id].path
    codes = case.codes[model_id].copy()
    codes[:10, -1] = (codes[:10, -1] + 1) % 1000  # another last code
    codes[10:15, 0] = 999  # another first code
    codes[20:23] = codes[30]  # three POIs join the SID of a fourth
    b = tmp_path / "b.parquet"
    pq.write_table(pa.table(arrow_columns(np.arange(1, N + 1), codes, np.zeros((N, LATENT)))), b)
    found = diff_codebooks(a, b).to_dict()
    for name in ("a", "b"):
        found[name].pop("path")
    assert found == _plain_diff(_codebooks(a), codes.tolist())
    assert found["moved_pois"] >= 4 and found["a"]["collided_sids"] > 0
    assert sid_layout(tuple(int(code) + 1 for code in codes.max(axis=0))).wide  # B's SIDs take two words
    for model in (a, published["org/rqvae-nyc-w8x256"].path):  # a file against itself: nothing differs or moves
        same = diff_codebooks(model, model)
        assert same.sid_differs == same.moved_pois == 0 and same.a == same.b
    result = CliRunner().invoke(diff_app, [str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == diff_codebooks(a, b).to_dict()


@pytest.mark.parametrize(
    ("rows", "high"),
    [(0, 8), (1, 8), (500, 3), (5000, 64), (3000, 1 << 62)],
    ids=["none", "one", "few", "many", "wide"],
)
def test_prefix_starts_number_prefixes_as_unique_does(rows, high):
    codes = np.random.default_rng(rows).integers(0, high, (rows, 4), dtype=np.int64)
    if rows:
        codes[: rows // 3, 1:] = codes[0, 1:]  # rows sharing longer prefixes
    codes = codes[np.lexsort(codes.T[::-1])]  # ascending, as SidCounter.items gives them
    for length, starts in enumerate(sid_stats.prefix_starts(codes), start=1):
        _, expected = np.unique(codes[:, :length], axis=0, return_inverse=True)
        np.testing.assert_array_equal(np.cumsum(starts) - 1, expected.ravel())
