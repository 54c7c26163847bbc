"""``--max-per-sid`` through the whole pipeline on the bundled NYC data: the same bytes whatever the batch size and
executor, the SIDs and figures of the rule (:mod:`tests.core.test_sid_cap` checks the rule itself), ``--dedup``
counted on the capped SIDs, the manifest's staleness check, ``--keep-existing``, and the usage error."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rqvae_ray.core.checkpoint import load_checkpoint_file
from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import codeword_sums
from rqvae_ray.errors import OutputError
from rqvae_ray.inputs.demo import write_dataset
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id, parse_model_ids
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, FEATURES_FILE, METADATA_FILE, PID_MAPPING_FILE, LocalHub
from rqvae_ray.outputs.layout import MANIFEST_FILE, output_dir
from rqvae_ray.outputs.readers import read_codebooks
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions, make_options
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models
from tests.core.test_checkpoint_safety import ROWS, fitted, run_in_process, small_hub, with_codebooks
from tests.sid_rules import dedup_rule, extended_rule

REPO = "comp5331poi/nyc"
MODEL = "comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5"
SPECS = parse_model_ids([MODEL])
FILE = "codebooks-rqvae-nyc-div0.25-commit0.5-lr5e-5"


def _run(hub: Path, out: Path, output: OutputSpec, notes: list[str] | None = None, **options) -> list:
    run_options = RunOptions(hub=LocalHub(hub), out_dir=str(out), output=output, **options)
    results = run_models(SPECS, run_options, Progress((notes if notes is not None else []).append))
    assert all(r.ok for r in results), [r.error for r in results]
    return results


def _folder(out: Path) -> Path:
    return output_dir(out, REPO, "LLM Dataset")


def _codes(path: Path) -> list[list[int]]:
    return [list(map(int, codes)) for codes in read_codebooks(path)["Codebook"]]


@pytest.fixture(scope="module")
def plain(demo_hub, tmp_path_factory) -> list[list[int]]:
    """The SIDs without a cap."""
    out = tmp_path_factory.mktemp("plain")
    _run(demo_hub, out, OutputSpec(OutputFormat.PARQUET), executor=ExecutorMode.LOCAL)
    return _codes(_folder(out) / f"{FILE}.parquet")


def test_capped_files_are_the_same_whatever_the_batches_and_executor(demo_hub, local_ray, tmp_path, plain):
    output = OutputSpec(dedup=True, sid_tokens=True, exports=frozenset({Export.INDEX_JSON}), max_per_sid=2)
    runs = {
        "b7": dict(executor=ExecutorMode.LOCAL, batch_size=7),
        "b4096": dict(executor=ExecutorMode.LOCAL, batch_size=4096),
        "ray": dict(executor=ExecutorMode.RAY, batch_size=1000),
    }
    results = {name: _run(demo_hub, tmp_path / name, output, **options) for name, options in runs.items()}
    files = sorted(p.name for p in _folder(tmp_path / "b7").glob(f"{FILE}*"))
    assert files == [f"{FILE}.csv", f"{FILE}.index.json", f"{FILE}.prefixes.json"]
    for name in ("b4096", "ray"):
        for file in files:
            assert (_folder(tmp_path / name) / file).read_bytes() == (_folder(tmp_path / "b7") / file).read_bytes()
    assert not list(_folder(tmp_path / "b7").glob(".*resume*"))  # a capped run keeps no resume journal

    path = _folder(tmp_path / "b7") / f"{FILE}.csv"
    frame = read_codebooks(path)
    with_dedup = [list(map(int, codes)) for codes in frame["Codebook"]]
    capped = [codes[:3] for codes in with_dedup]
    assert max(Counter(map(tuple, capped)).values()) == 2
    assert with_dedup == dedup_rule(capped)  # dedup after the cap
    moved = sum(a != b for a, b in zip(capped, plain, strict=True))
    assert moved > 0
    books = load_checkpoint_file(demo_hub / "models" / MODEL / CHECKPOINT_FILE).codebooks
    np.testing.assert_array_equal(np.stack(frame["Vector"]), codeword_sums(books, np.array(capped)))
    assert list(frame["SID"]) == ["".join(f"<{'abcd'[i]}_{c}>" for i, c in enumerate(codes)) for codes in with_dedup]

    quality = results["b7"][0].quality
    assert quality["cap"]["max_per_sid"] == 2 and quality["cap"]["moved_pois"] == moved
    assert quality["cap"]["extra_distance_sum"] > 0
    assert quality["largest_bucket"] == 2
    assert results["ray"][0].quality == quality
    entry = json.loads((_folder(tmp_path / "b7") / MANIFEST_FILE).read_text())["files"][f"{FILE}.csv"]
    assert entry["max_per_sid"] == 2 and entry["sid_stats"]["cap"] == quality["cap"]


def test_parquet_holds_the_same_capped_sids_and_a_changed_cap_redoes_the_file(demo_hub, tmp_path):
    _run(demo_hub, tmp_path / "csv", OutputSpec(max_per_sid=1), executor=ExecutorMode.LOCAL)
    out = tmp_path / "parquet"
    _run(demo_hub, out, OutputSpec(OutputFormat.PARQUET, max_per_sid=1), executor=ExecutorMode.LOCAL)
    path = _folder(out) / f"{FILE}.parquet"
    assert _codes(path) == _codes(_folder(tmp_path / "csv") / f"{FILE}.csv")
    assert len(set(map(tuple, _codes(path)))) == len(_codes(path))  # K = 1: every SID unique

    notes: list[str] = []
    results = _run(demo_hub, out, OutputSpec(OutputFormat.PARQUET, max_per_sid=1), notes, executor=ExecutorMode.LOCAL)
    assert results[0].skipped
    notes.clear()
    results = _run(demo_hub, out, OutputSpec(OutputFormat.PARQUET, max_per_sid=3), notes, executor=ExecutorMode.LOCAL)
    assert not results[0].skipped
    assert f"{MODEL}: replacing {FILE}.parquet: it was written with other options (now --max-per-sid 3)" in notes
    notes.clear()
    _run(demo_hub, out, OutputSpec(OutputFormat.PARQUET), notes, executor=ExecutorMode.LOCAL)
    assert f"{MODEL}: replacing {FILE}.parquet: it was written with other options (now no --max-per-sid)" in notes


def _cut_hub(demo_hub: Path, root: Path, rows: int, changed: dict[int, int] | None = None) -> Path:
    """A hub of the model and the first ``rows`` NYC POIs, the features of Pid ``p`` replaced by those of Pid
    ``changed[p]``."""
    base = demo_hub / "datasets" / REPO
    features = torch.load(base / FEATURES_FILE, weights_only=True).numpy()
    for pid, source in (changed or {}).items():
        features[pid - 1] = features[source - 1]
    features = features[:rows]
    metadata = json.loads((base / METADATA_FILE).read_text())
    with (base / PID_MAPPING_FILE).open(newline="") as handle:
        mapping = list(csv.reader(handle))[1:]
    target = root / "models" / MODEL / CHECKPOINT_FILE
    target.parent.mkdir(parents=True)
    shutil.copy(demo_hub / "models" / MODEL / CHECKPOINT_FILE, target)
    write_dataset(root, REPO, features, {**metadata, "num_pois": rows}, mapping[:rows])
    return root


def test_keep_existing_keeps_capped_rows_and_counts_them_toward_the_cap(demo_hub, tmp_path, plain):
    output = OutputSpec(dedup=True, keep_existing=True, max_per_sid=1)
    out = tmp_path / "out"
    _run(_cut_hub(demo_hub, tmp_path / "cut", 3000), out, output, executor=ExecutorMode.LOCAL)
    path = _folder(out) / f"{FILE}.csv"
    first = path.read_bytes()
    _run(demo_hub, out, output, executor=ExecutorMode.LOCAL)
    whole = path.read_bytes()
    assert whole.startswith(first)  # the kept rows byte for byte
    codes = _codes(path)
    assert len(codes) == 5135 and len(set(map(tuple, codes))) == 5135  # kept POIs count toward K = 1
    kept_sids = {tuple(c) for c in codes[:3000]}
    # a new POI whose SID a kept POI holds moved; one whose SID is free and unshared kept it
    new_plain = plain[3000:]
    for code, was in zip(codes[3000:], new_plain, strict=True):
        if tuple(was) in kept_sids:
            assert code != was
    assert codes == extended_rule(codes[:3000], codes[3000:])  # no dedup code is needed once every SID is unique


def test_keep_existing_refuses_a_capped_file_whose_features_changed(demo_hub, tmp_path):
    """A POI the cap moved holds another SID than its nearest, so changed features cannot be checked: the run refuses
    with one line before any work and leaves the published files as they are; --force redoes them."""
    output = OutputSpec(dedup=True, keep_existing=True, max_per_sid=1)
    out = tmp_path / "out"
    _run(_cut_hub(demo_hub, tmp_path / "cut", 1000), out, output, executor=ExecutorMode.LOCAL)
    folder = _folder(out)
    published = {p.name: p.read_bytes() for p in folder.iterdir()}
    changed = _cut_hub(demo_hub, tmp_path / "changed", 1000, {5: 900})
    notes: list[str] = []
    options = RunOptions(hub=LocalHub(changed), out_dir=str(out), output=output, executor=ExecutorMode.LOCAL)
    [result] = run_models(SPECS, options, Progress(notes.append))
    path = folder / f"{FILE}.csv"
    assert not result.ok and result.error == (
        f"cannot keep the rows of {path}: the features of its POIs changed or were not recorded, and --max-per-sid "
        "moved some of them, so their SIDs cannot be checked; use --force to redo it"
    )
    assert not any("encoding them again" in note or "POIs written" in note for note in notes), notes
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == published  # byte for byte, nothing beside them

    fresh = replace(output, keep_existing=False)
    [redone] = _run(changed, out, fresh, force=True, executor=ExecutorMode.LOCAL)
    assert not redone.skipped and redone.rows == 1000
    _run(changed, tmp_path / "fresh", fresh, executor=ExecutorMode.LOCAL)
    assert path.read_bytes() == (_folder(tmp_path / "fresh") / path.name).read_bytes() != published[path.name]


def test_too_few_sids_for_the_cap_fail_the_model_before_any_work(tmp_path, capfd):
    """K x the possible SIDs below the POIs: that model fails with one line before it is encoded and writes no file;
    the run's other model is written, and the exit status says a model failed."""
    roomy, tiny = DEFAULT_MODELS[:2]  # NYC models: 32 x 32 x 32 SIDs, and 2 x 2 x 2
    small = with_codebooks(fitted(tiny), lambda books: [book[:2] for book in books])
    hub = small_hub(tmp_path / "hub", {roomy: fitted(roomy), tiny: small})
    out = tmp_path / "out"
    status, output = run_in_process(hub, out, capfd, "--max-per-sid", "1", roomy, tiny)
    assert status == 1, output
    assert [line for line in output.splitlines() if line.startswith("error: ")] == [
        f"error: {tiny}: --max-per-sid 1 leaves room for 8 POIs (8 SIDs) but there are {ROWS}; raise --max-per-sid"
    ]
    assert f"{tiny}: published checkpoint" not in output  # refused before it was taken to encode
    folder = _folder(out)
    written = f"codebooks-{parse_model_id(roomy).name}.csv"
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST_FILE, written])
    assert len(_codes(folder / written)) == ROWS


def test_a_cap_below_one_is_a_usage_error():
    with pytest.raises(OutputError) as caught:
        make_options(hub_dir=".", out_dir=".", max_per_sid=0)
    assert str(caught.value) == (
        "--max-per-sid 0: at most K POIs keep one SID, so K must be 1 or more; give a K of 1 or more, or leave the "
        "option out"
    )
