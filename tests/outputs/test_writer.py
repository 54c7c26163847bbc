"""The encode stage and the final writer in-process (no Ray): bytes independent of block sizes and plan, the dedup
rule, validation, and nothing partial left behind."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqvae_ray.core.contract import EncodedColumns, Export, ModelSlot, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import Encoder, SparseRows
from rqvae_ray.core.formatting import CSV_HEADER, CSV_HEADER_WITH_SID, csv_lines, csv_parts, string_bytes
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.core.sid_stats import SidCounter, pack_codes
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.existing_rows import ExistingRows
from rqvae_ray.outputs.layout import MANIFEST_FILE, output_dir
from rqvae_ray.outputs.manifest import ExtendedFile, Manifest, Provenance
from rqvae_ray.outputs.readers import read_codebooks
from rqvae_ray.outputs.resume import ResumeState, journal_path
from rqvae_ray.outputs.staging import folder_lock
from rqvae_ray.outputs.targets import ModelTarget, Refused
from rqvae_ray.outputs.writer import DatasetWriter
from rqvae_ray.ray_backend.writer_actor import WriterActor, WriterKey
from tests.sid_rules import assert_exports_match, dedup_rule, extended_rule
from tests.unit_models import rows, weights
from tests.writing import dataset_output, dataset_writer, encode_stage

N = 240
REPO = "org/nyc"
MODELS = [("org/rqvae-nyc-a", weights(1)), ("org/rqvae-nyc-b", weights(2))]


def _targets(fmt: OutputFormat) -> list[ModelTarget]:
    return [
        ModelTarget(
            model_id=model_id,
            slot=slot,
            filename=f"codebooks-{model_id.split('/')[1]}.{fmt.value}",
            codebook_sizes=w.codebook_sizes,
            provenance=Provenance("c", "r", "f", "r"),
            codebooks=w.codebooks,
        )
        for slot, (model_id, w) in enumerate(MODELS)
    ]


def _blocks(sizes: list[int]) -> list[pa.Table]:
    data, start, tables = rows(N), 0, []
    for size in sizes:
        stop = min(start + size, N)
        lo, hi = data.indptr[start], data.indptr[stop]
        part = SparseRows(data.indptr[start : stop + 1] - lo, data.indices[lo:hi], None)
        tables.append(sparse_table(part, first_pid=start + 1))
        start = stop
    assert start == N
    return tables


def _encode(blocks: list[pa.Table], spec: OutputSpec, packed: bool) -> list[pa.Table]:
    models = [(model_id, slot, w) for slot, (model_id, w) in enumerate(MODELS)]
    if packed:
        stages = [encode_stage(REPO, models, spec)]
    else:
        stages = [encode_stage(REPO, [m], spec, keep_inputs=i < len(models) - 1) for i, m in enumerate(models)]
    out = []
    for block in blocks:
        for stage in stages:
            block = stage(block)
        out.append(block)
    return out


def _write(tmp_path, blocks: list[pa.Table], spec: OutputSpec, num_pois: int = N) -> DatasetWriter:
    writer = dataset_writer(REPO, _targets(spec.fmt), str(tmp_path), spec, num_pois)
    for block in blocks:
        writer.write(block)
    return writer


def _folder(tmp_path):
    return output_dir(tmp_path, REPO, "LLM Dataset")


def _expected_csv(model: int, tokens: bool) -> bytes:
    codes, vectors = Encoder(MODELS[model][1]).encode(rows(N))
    pids = np.arange(1, N + 1)
    header = CSV_HEADER_WITH_SID if tokens else CSV_HEADER
    return header + string_bytes(csv_lines(csv_parts(pids, codes, vectors, tokens)))


@pytest.mark.parametrize(("sizes", "packed"), [([N], True), ([1, 7, 64, 168], True), ([100, 140], False)])
def test_csv_bytes_do_not_depend_on_blocks_or_plan(tmp_path, sizes, packed):
    spec = OutputSpec(sid_tokens=True)
    published = _write(tmp_path, _encode(_blocks(sizes), spec, packed), spec).finish()
    assert [p.entry.model_id for p in published] == [m for m, _ in MODELS]
    for model, item in enumerate(published):
        assert (_folder(tmp_path) / item.entry.file).read_bytes() == _expected_csv(model, tokens=True)
        assert item.entry.rows == N and item.entry.sid_stats["pois"] == N
    manifest = Manifest.read(_folder(tmp_path), REPO)
    assert set(manifest.entries) == {p.entry.file for p in published}
    assert sorted(p.name for p in _folder(tmp_path).iterdir()) == sorted([MANIFEST_FILE, *manifest.entries])


def _dedup_rule(codes: np.ndarray) -> list[list[int]]:
    """Independent statement of --dedup: POIs sharing an SID get 0, 1, 2, ... in Pid order; unique SIDs none."""
    keys = [tuple(c) for c in codes.tolist()]
    counts = {k: keys.count(k) for k in set(keys)}
    seen: dict[tuple, int] = {}
    out = []
    for key in keys:
        if counts[key] > 1:
            out.append([*key, seen.get(key, 0)])
            seen[key] = seen.get(key, 0) + 1
        else:
            out.append(list(key))
    return out


def test_parquet_with_dedup_follows_the_rule_and_equals_the_encoder(tmp_path):
    spec = OutputSpec(OutputFormat.PARQUET, dedup=True, sid_tokens=True)
    published = _write(tmp_path, _encode(_blocks([50, 50, 140]), spec, packed=True), spec).finish()
    for model, item in enumerate(published):
        table = pq.read_table(_folder(tmp_path) / item.entry.file)
        codes, vectors = Encoder(MODELS[model][1]).encode(rows(N))
        assert table.column("Pid").to_pylist() == list(range(1, N + 1))
        assert table.column("Codebook").to_pylist() == _dedup_rule(codes)
        np.testing.assert_array_equal(np.array(table.column("Vector").to_pylist(), dtype=np.float32), vectors)
        assert any(len(c) == 4 for c in table.column("Codebook").to_pylist())  # the tiny codebooks collide
        letters = "abcd"
        sid = ["".join(f"<{letters[i]}_{c}>" for i, c in enumerate(code)) for code in _dedup_rule(codes)]
        assert table.column("SID").to_pylist() == sid


def test_csv_dedup_equals_parquet_dedup(tmp_path):
    csv_spec = OutputSpec(OutputFormat.CSV, dedup=True)
    parquet_spec = OutputSpec(OutputFormat.PARQUET, dedup=True)
    csv_files = _write(tmp_path / "c", _encode(_blocks([N]), csv_spec, True), csv_spec).finish()
    pq_files = _write(tmp_path / "p", _encode(_blocks([N]), parquet_spec, True), parquet_spec).finish()
    for a, b in zip(csv_files, pq_files, strict=True):
        lines = (_folder(tmp_path / "c") / a.entry.file).read_text().splitlines()[1:]
        want = pq.read_table(_folder(tmp_path / "p") / b.entry.file).column("Codebook").to_pylist()
        assert [line.split('"')[1] for line in lines] == [str(c) for c in want]


def test_rows_out_of_pid_order_name_the_pid(tmp_path):
    spec = OutputSpec()
    first, second, third = _encode(_blocks([80, 80, 80]), spec, True)
    writer = _write(tmp_path, [first], spec)
    with pytest.raises(OutputError, match="Pid 161 where 81 was expected"):
        writer.write(third)
    writer.abort()
    assert list(_folder(tmp_path).iterdir()) == []


def test_missing_rows_publish_nothing(tmp_path):
    spec = OutputSpec()
    writer = _write(tmp_path, _encode(_blocks([100, 140]), spec, True)[:1], spec)
    with pytest.raises(OutputError, match="wrote 100 rows but the dataset has 240 POIs"):
        writer.finish()
    assert list(_folder(tmp_path).iterdir()) == []


def test_a_code_outside_the_codebooks_is_rejected(tmp_path):
    spec = OutputSpec()
    (block,) = _encode(_blocks([N]), spec, True)
    bad = pa.table({"Pid": block.column("Pid")})
    for slot in range(len(MODELS)):
        sid = pa.array(np.full(N, 10**6, dtype=np.int64))
        bad = ModelSlot(slot).attach(bad, EncodedColumns(sid, lines=ModelSlot(slot).read(block).lines))
    writer = _write(tmp_path, [], spec)
    with pytest.raises(OutputError, match="outside the codebook sizes"):
        writer.write(bad)
    writer.abort()
    assert list(_folder(tmp_path).iterdir()) == []


def test_an_output_folder_that_cannot_be_made_is_one_output_error(tmp_path):
    (tmp_path / "datasets").write_text("a file where a folder must go")
    with pytest.raises(OutputError, match="choose a writable --out-dir"):
        dataset_writer(REPO, _targets(OutputFormat.CSV), str(tmp_path), OutputSpec(), N)


def test_writer_actor_keeps_each_parts_writer_apart_and_a_failed_open_fails_its_calls(tmp_path):
    spec = OutputSpec()
    blocks = _encode(_blocks([60, 60, 60, 60]), spec, True)
    ours, other, second = WriterKey(REPO, 0), WriterKey("org/other", 0), WriterKey(REPO, 1)
    actor = WriterActor()
    targets = _targets(OutputFormat.CSV)
    actor.open(ours, dataset_output(REPO, targets[:1], tmp_path, spec, N))
    actor.open(second, dataset_output(REPO, targets[1:], tmp_path, spec, N))  # the other model, same dataset
    (tmp_path / "bad").write_text("a file where a folder must go")
    with pytest.raises(OutputError):
        actor.open(other, dataset_output("org/other", targets, tmp_path / "bad", spec, N))
    with pytest.raises(OutputError, match="choose a writable --out-dir"):
        actor.write(other, blocks[0], None)
    for key in (ours, second):
        assert actor.write(key, blocks[0], None) == 60
        assert actor.write(key, blocks[1], (0, 60)) == 120
        assert actor.write(key, blocks[2], None) == 180
        assert actor.write(key, blocks[3], None) == 240
    published = [*actor.finish(ours), *actor.finish(second)]
    for model, item in enumerate(published):
        assert (_folder(tmp_path) / item.entry.file).read_bytes() == _expected_csv(model, tokens=False)
    # Both parts entered their model in the folder's one manifest.
    assert sorted(Manifest.read(_folder(tmp_path), REPO).entries) == sorted(item.entry.file for item in published)


def test_runs_publishing_into_one_folder_at_once_keep_each_others_entries(tmp_path):
    spec, other = OutputSpec(), OutputSpec(OutputFormat.PARQUET)
    theirs = _write(tmp_path / "elsewhere", _encode(_blocks([N]), other, True), other).finish()
    writer = _write(tmp_path, _encode(_blocks([N]), spec, True), spec)
    published = []
    with folder_lock(_folder(tmp_path)):  # another run is publishing its Parquet files into this folder
        run = threading.Thread(target=lambda: published.extend(writer.finish()))
        run.start()
        run.join(timeout=1.0)
        assert run.is_alive() and not published  # waits for the other run instead of merging at the same time
        manifest = Manifest.read(_folder(tmp_path), REPO)
        manifest.entries.update({item.entry.file: item.entry for item in theirs})
        manifest.write()
    run.join(timeout=60)
    assert [item.entry.model_id for item in published] == [m for m, _ in MODELS]
    entries = Manifest.read(_folder(tmp_path), REPO).entries
    assert entries == {item.entry.file: item.entry for item in [*theirs, *published]} and len(entries) == 4


def _codes(model: int, data: SparseRows | None = None) -> list[list[int]]:
    return Encoder(MODELS[model][1]).encode(rows(N) if data is None else data)[0].tolist()


def _codebooks(path) -> list[list[int]]:
    return [list(code) for code in read_codebooks(path)["Codebook"]]


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
def test_fixed_length_gives_every_poi_a_dedup_code(tmp_path, fmt):
    spec = OutputSpec(fmt, dedup=True, fixed_length=True, sid_tokens=True)
    published = _write(tmp_path, _encode(_blocks([50, 190]), spec, packed=True), spec).finish()
    for model, item in enumerate(published):
        got = _codebooks(_folder(tmp_path) / item.entry.file)
        assert got == dedup_rule(_codes(model), fixed_length=True)
        assert {len(code) for code in got} == {4} and len({tuple(code) for code in got}) == N
        assert item.entry.fixed_length and item.entry.dedup


M = 100  # rows of the existing file in the tests below


def _first_file(tmp_path, spec: OutputSpec) -> list:
    """Files of the first M POIs, as a first run over a dataset of M POIs writes them."""
    return _write(tmp_path, _encode(_blocks([60, 40, 140])[:2], spec, True), spec, num_pois=M).finish()


def _extend(tmp_path, spec: OutputSpec, existing: list, first_pid: int, data_seed: int = 0) -> DatasetWriter:
    """A writer whose models start from ``existing`` (one per model, or None), given the blocks from ``first_pid``."""
    targets = [replace(t, existing=e) for t, e in zip(_targets(spec.fmt), existing, strict=True)]
    writer = dataset_writer(REPO, targets, str(tmp_path), spec, N, first_pid)
    data = rows(N, seed=data_seed)
    for start in range(first_pid - 1, N, 70):
        stop = min(start + 70, N)
        lo, hi = data.indptr[start], data.indptr[stop]
        part = SparseRows(data.indptr[start : stop + 1] - lo, data.indices[lo:hi], None)
        (block,) = _encode([sparse_table(part, first_pid=start + 1)], spec, packed=True)
        writer.write(block)
    return writer


@pytest.mark.parametrize(
    ("fmt", "dedup"), [(OutputFormat.CSV, False), (OutputFormat.CSV, True), (OutputFormat.PARQUET, True)]
)
def test_a_file_starts_with_the_rows_of_an_existing_one(tmp_path, fmt, dedup):
    spec = OutputSpec(fmt, dedup=dedup, sid_tokens=True, exports=frozenset({Export.INDEX_JSON, Export.TENSOR}))
    first = _first_file(tmp_path / "first", spec)
    existing = [ExistingRows(p.path, M, p.entry.sha256) for p in first]
    published = _extend(tmp_path / "next", spec, existing, M + 1).finish()
    for model, (old, new) in enumerate(zip(first, published, strict=True)):
        codes = _codes(model)
        kept = _codebooks(old.path)
        want = extended_rule(kept, codes[M:]) if dedup else codes
        assert _codebooks(new.path) == want
        if fmt is OutputFormat.CSV:
            old_bytes = Path(old.path).read_bytes()
            assert Path(new.path).read_bytes()[: len(old_bytes)] == old_bytes
        else:
            assert pq.read_table(new.path).slice(0, M).equals(pq.read_table(old.path))
        assert new.entry.extends == ExtendedFile(old.entry.sha256, M) and new.entry.rows == N
        assert new.entry.sid_stats["pois"] == N and new.entry.sid_stats == _stats_of(codes, model)
        assert_exports_match(_folder(tmp_path / "next"), new.entry.file, 3, dedup, {"index-json", "tensor"})
    if dedup:  # a kept POI without a dedup code whose SID a new POI shares: its 3 codes prefix the new 4
        rule = extended_rule(_codebooks(first[0].path), _codes(0)[M:])
        assert any(len(a) == 3 and b[:3] == a for a in rule[:M] for b in rule[M:])


def _stats_of(codes: list[list[int]], model: int) -> dict:
    counter = SidCounter(MODELS[model][1].codebook_sizes)
    counter.add(pack_codes(np.array(codes), MODELS[model][1].codebook_sizes))
    return counter.summary()


def test_kept_rows_given_again_are_ignored_or_verified(tmp_path):
    """The blocks start at Pid 1 when any model verifies its kept rows: a model that trusts its file ignores them."""
    spec = OutputSpec(dedup=True)
    first = _first_file(tmp_path / "first", spec)
    existing = [ExistingRows(first[0].path, M, first[0].entry.sha256), ExistingRows(first[1].path, M, verify=True)]
    published = _extend(tmp_path / "next", spec, existing, 1).finish()
    for model, item in enumerate(published):
        assert _codebooks(item.path) == extended_rule(_codebooks(first[model].path), _codes(model)[M:])


def test_kept_pois_whose_sid_changed_refuse_only_their_model(tmp_path):
    spec = OutputSpec()
    first = _first_file(tmp_path / "first", spec)
    existing = [ExistingRows(first[0].path, M, verify=True), None]
    results = _extend(tmp_path / "next", spec, existing, 1, data_seed=5).finish()
    now = _codes(0, rows(N, seed=5))
    changed = [pid for pid, (a, b) in enumerate(zip(_codes(0)[:M], now[:M], strict=True), 1) if a != b]
    assert len(changed) > 1
    assert results[0] == Refused(
        MODELS[0][0],
        f"{len(changed)} POI(s) already in {first[0].entry.file} now get another SID (first Pid {changed[0]}): "
        "their features changed since it was written; --force redoes the file from scratch",
    )
    assert _codebooks(results[1].path) == _codes(1, rows(N, seed=5))
    folder = _folder(tmp_path / "next")
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST_FILE, results[1].entry.file])
    assert set(Manifest.read(folder, REPO).entries) == {results[1].entry.file}


def test_an_existing_file_that_ends_early_is_an_output_error(tmp_path):
    spec = OutputSpec()
    first = _first_file(tmp_path / "first", spec)
    targets = [replace(t, existing=ExistingRows(p.path, 150)) for t, p in zip(_targets(spec.fmt), first, strict=True)]
    writer = dataset_writer(REPO, targets, str(tmp_path / "next"), spec, N, 151)
    with pytest.raises(OutputError, match="ends after 100 rows, before the 150 to keep; use --force"):
        writer.finish()
    assert list(_folder(tmp_path / "next").iterdir()) == []


def _resumable_targets(fmt: OutputFormat, resume_rows: int = 0) -> list[ModelTarget]:
    return [
        dataclasses.replace(
            t, codebooks=MODELS[t.slot][1].codebooks, resume_key=f"key-{t.slot}", resume_rows=resume_rows
        )
        for t in _targets(fmt)
    ]


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_an_interrupted_file_resumes_to_the_same_bytes(tmp_path, fmt, dedup):
    spec = OutputSpec(fmt, dedup=dedup, sid_tokens=True)
    blocks = _encode(_blocks([70, 30, 50, 90]), spec, packed=True)
    reference = _write(tmp_path / "whole", blocks, spec).finish()
    out = tmp_path / "interrupted"
    first = dataset_writer(REPO, _resumable_targets(fmt), str(out), spec, N)
    for block in blocks[:2]:
        first.write(block)
    first.checkpoint()  # 100 rows safe on disk ...
    first.write(blocks[2])  # ... and 50 more that are not, when the process is killed
    states = [ResumeState.read(_folder(out) / t.filename) for t in _targets(fmt)]
    assert [(s.key, s.rows) for s in states] == [("key-0", 100), ("key-1", 100)]
    del first  # killed: no finish, no abort
    second = dataset_writer(REPO, _resumable_targets(fmt, 100), str(out), spec, N, first_pid=101)
    for block in _encode(_blocks([100, 50, 90]), spec, packed=True)[1:]:
        second.write(block)
    for want, got in zip(reference, second.finish(), strict=True):
        assert (_folder(out) / got.entry.file).read_bytes() == (
            _folder(tmp_path / "whole") / want.entry.file
        ).read_bytes()
        assert got.entry.sha256 == want.entry.sha256 and got.entry.sid_stats == want.entry.sid_stats
    published = sorted(p.name for p in _folder(out).iterdir() if not p.name.endswith(".partial"))
    assert published == sorted(p.name for p in _folder(tmp_path / "whole").iterdir())  # no resume state left


def test_an_interruption_keeps_the_resume_state_and_a_failure_drops_it(tmp_path):
    spec = OutputSpec()
    blocks = _encode(_blocks([100, 140]), spec, packed=True)
    for keep in (True, False):
        out = tmp_path / str(keep)
        writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(out), spec, N)
        writer.write(blocks[0])
        writer.abort(keep_resume=keep)
        names = sorted(p.name for p in _folder(out).iterdir())
        if keep:  # Ctrl-C: exactly where it stopped, and no partial output
            assert names == sorted(
                f".{t.filename}{end}" for t in _targets(OutputFormat.CSV) for end in (".resume", ".resume.json")
            )
            assert ResumeState.read(_folder(out) / _targets(OutputFormat.CSV)[0].filename).rows == 100
        else:
            assert names == []


def test_two_aborts_at_once_drop_the_files_once_and_the_later_returns_when_they_are_gone(tmp_path):
    """A stopping run aborts a dataset that does not stop in time from its main thread while the dataset's own thread
    may abort it too: the sinks are discarded once, and neither call returns before the files are dropped."""
    spec = OutputSpec()
    writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(tmp_path), spec, N)
    writer.write(_encode(_blocks([100, 140]), spec, packed=True)[0])
    first_sink, discard = writer.sinks[0], writer.sinks[0].discard
    entered, release, calls, left = threading.Event(), threading.Event(), [], {}

    def held_discard(keep_resume: bool = False) -> None:
        calls.append(keep_resume)
        entered.set()
        assert release.wait(60)
        discard(keep_resume)

    first_sink.discard = held_discard

    def abort(name: str) -> None:
        writer.abort(keep_resume=True)
        left[name] = sorted(p.name for p in _folder(tmp_path).iterdir() if p.name.endswith(".partial"))

    first = threading.Thread(target=abort, args=("first",))
    first.start()
    assert entered.wait(60)
    second = threading.Thread(target=abort, args=("second",))
    second.start()
    release.set()
    for thread in (first, second):
        thread.join(60)
        assert not thread.is_alive()
    assert calls == [True]
    assert left == {"first": [], "second": []}


def test_a_resume_state_whose_journal_was_replaced_or_cut_is_dropped(tmp_path):
    spec = OutputSpec()
    writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(tmp_path), spec, N)
    writer.write(_encode(_blocks([100, 140]), spec, packed=True)[0])
    writer.checkpoint()
    writer.abort(keep_resume=True)
    replaced, cut = (_folder(tmp_path) / t.filename for t in _targets(OutputFormat.CSV))
    assert ResumeState.read(replaced).rows == ResumeState.read(cut).rows == 100
    # A run writing the same file at the same time starts its own journal there: the same path, another file.
    other = journal_path(replaced).with_name("other-journal")
    other.write_bytes(journal_path(replaced).read_bytes())
    other.replace(journal_path(replaced))
    assert ResumeState.read(replaced) is None
    with journal_path(cut).open("r+b") as journal:
        journal.truncate(99 * 8)
    assert ResumeState.read(cut) is None


def test_parquet_bytes_do_not_depend_on_blocks_or_plan(tmp_path):
    spec = OutputSpec(OutputFormat.PARQUET, sid_tokens=True)
    files = []
    for name, sizes, packed in (("one", [N], True), ("many", [1, 7, 64, 168], True), ("chained", [100, 140], False)):
        published = _write(tmp_path / name, _encode(_blocks(sizes), spec, packed), spec).finish()
        files.append([(_folder(tmp_path / name) / p.entry.file).read_bytes() for p in published])
    assert files[0] == files[1] == files[2]
