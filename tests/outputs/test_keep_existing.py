"""--keep-existing on the bundled NYC data cut in two and then completed: the kept rows unchanged byte for byte, the
new POIs' codes by the rule, changed features refused (or accepted when no SID changed), the checks made before any
work, the download of a published file when only uploading, the usage errors, and the whole on Ray.

Most runs are in-process: the driver's own loading and decisions (:func:`rqvae_ray.pipeline.jobs.load_dataset`), then
the encode stage and the writer without Ray, as the pipeline wires them. Two runs go through Ray.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from huggingface_hub import constants
from typer.testing import CliRunner

from rqvae_ray.api.batch_inference import BatchInferenceProcessor
from rqvae_ray.cli.app import app
from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.core.rows import sparse_table
from rqvae_ray.errors import OutputError
from rqvae_ray.inputs import feature_digest
from rqvae_ray.inputs.demo import write_dataset
from rqvae_ray.inputs.feature_digest import rows_digests
from rqvae_ray.inputs.features import PoiFeatures, load_features
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, FEATURES_FILE, METADATA_FILE, PID_MAPPING_FILE, HfHub, LocalHub
from rqvae_ray.outputs.keep_existing import find_published
from rqvae_ray.outputs.layout import MANIFEST_FILE, output_dir
from rqvae_ray.outputs.manifest import ExtendedFile, Manifest, ManifestEntry
from rqvae_ray.outputs.readers import read_codebooks
from rqvae_ray.outputs.targets import Published, Refused
from rqvae_ray.outputs.writer import DatasetWriter
from rqvae_ray.pipeline.jobs import dataset_output, load_dataset, stage_models
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models
from rqvae_ray.stages.encode import EncodeModels
from tests.hub_server import HubServer
from tests.reference import reference_sids
from tests.sid_rules import assert_exports_match, dedup_rule, extended_rule

REPO = "comp5331poi/nyc"
SPECS = parse_model_ids([DEFAULT_MODELS[0], DEFAULT_MODELS[1]])  # two NYC models
CUT = 3000
BASE = "LLM Dataset"
EXPORTS = frozenset({Export.INDEX_JSON, Export.TENSOR})


def _source(demo_hub: Path) -> tuple[np.ndarray, dict, list[list[str]]]:
    base = demo_hub / "datasets" / REPO
    features = torch.load(base / FEATURES_FILE, weights_only=True).numpy()
    metadata = json.loads((base / METADATA_FILE).read_text())
    with (base / PID_MAPPING_FILE).open(newline="") as handle:
        mapping = list(csv.reader(handle))[1:]
    return features, metadata, mapping


def _hub(demo_hub: Path, root: Path, features: np.ndarray, checkpoints: dict | None = None) -> Path:
    """A hub with the NYC models (``checkpoints`` maps a model to the demo model whose checkpoint it gets) and the
    NYC dataset with ``features`` (its first rows, or changed ones)."""
    _, metadata, mapping = _source(demo_hub)
    for spec in SPECS:
        source = (checkpoints or {}).get(spec, spec)
        target = root / "models" / spec.org / spec.name / CHECKPOINT_FILE
        target.parent.mkdir(parents=True)
        shutil.copy(demo_hub / "models" / source.org / source.name / CHECKPOINT_FILE, target)
    write_dataset(root, REPO, features, {**metadata, "num_pois": len(features)}, mapping[: len(features)])
    return root


@pytest.fixture(scope="module")
def nyc(demo_hub, tmp_path_factory):
    """The cut hub (first 3,000 POIs), the full hub (5,135), and every model's reference codes of all POIs."""
    features = _source(demo_hub)[0]
    root = tmp_path_factory.mktemp("keep")
    codes = {}
    for spec in SPECS:
        state = torch.load(demo_hub / "models" / spec.org / spec.name / CHECKPOINT_FILE, weights_only=True)
        codes[spec.model_id] = reference_sids(state["model_state_dict"], features)[0].tolist()
    return {
        "cut": _hub(demo_hub, root / "cut", features[:CUT]),
        "full": _hub(demo_hub, root / "full", features),
        "features": features,
        "codes": codes,
    }


def _run(hub: Path, out: Path, spec: OutputSpec, specs=SPECS) -> tuple[dict, list[str], int]:
    """One run in-process, as the pipeline wires it without Ray: results by model, notes, and the first Pid."""
    notes: list[str] = []
    options = RunOptions(hub=LocalHub(hub), out_dir=str(out), output=spec)
    loaded = load_dataset(REPO, specs, options, Progress(notes.append))
    results = {model: result.error for model, result in loaded.results.items()}
    if loaded.ready:
        features = loaded.features
        writer = DatasetWriter(dataset_output(loaded, options))
        stage = EncodeModels(repo=REPO, models=stage_models(loaded), spec=spec)
        for start in range(loaded.first_pid - 1, features.num_pois, 1024):
            stop = min(start + 1024, features.num_pois)
            writer.write(stage(sparse_table(features.rows.slice(start, stop), first_pid=start + 1)))
        for item in writer.finish():
            results[item.entry.model_id if isinstance(item, Published) else item.model_id] = item
    return results, notes, loaded.first_pid


def _file(out: Path, spec, fmt: OutputFormat = OutputFormat.CSV) -> Path:
    return output_dir(out, REPO, BASE) / f"codebooks-{spec.name}.{fmt.value}"


def _codebooks(path: Path) -> list[list[int]]:
    return [list(code) for code in read_codebooks(path)["Codebook"]]


@pytest.mark.parametrize(
    ("fmt", "dedup", "fixed"),
    [(OutputFormat.CSV, False, False), (OutputFormat.CSV, True, False), (OutputFormat.PARQUET, True, True)],
    ids=["csv", "csv-dedup", "parquet-fixed-length"],
)
def test_a_cut_dataset_completed_keeps_every_poi(nyc, tmp_path, fmt, dedup, fixed):
    spec = OutputSpec(fmt, dedup=dedup, fixed_length=fixed, exports=EXPORTS, keep_existing=True)
    first, notes, first_pid = _run(nyc["cut"], tmp_path, spec)
    assert first_pid == 1 and all(isinstance(r, Published) for r in first.values())
    assert any("no published" in note and "writing it whole" in note for note in notes)
    old = {s.model_id: _file(tmp_path, s, fmt).read_bytes() for s in SPECS}
    second, notes, first_pid = _run(nyc["full"], tmp_path, spec)
    assert first_pid == CUT + 1  # the kept POIs' features are unchanged: only the new ones are encoded
    assert any(f"keeping the {CUT} POIs" in note and f"encoding Pids {CUT + 1}..5135" in note for note in notes)
    digests = rows_digests(load_features(LocalHub(nyc["full"]).dataset_files("comp5331poi", "nyc")), [CUT, 5135])
    for spec_ in SPECS:
        path, codes = _file(tmp_path, spec_, fmt), nyc["codes"][spec_.model_id]
        entry = second[spec_.model_id].entry
        if fmt is OutputFormat.CSV:
            assert path.read_bytes()[: len(old[spec_.model_id])] == old[spec_.model_id]
        else:
            kept = pq.read_table(path).slice(0, CUT)
            assert kept.equals(pq.read_table(pa.BufferReader(old[spec_.model_id])))
        kept_codes = dedup_rule(codes[:CUT], fixed) if dedup else codes[:CUT]
        want = extended_rule(kept_codes, codes[CUT:], fixed) if dedup else codes
        assert _codebooks(path) == want
        assert entry.extends == ExtendedFile(first[spec_.model_id].entry.sha256, CUT) and entry.rows == 5135
        assert first[spec_.model_id].entry.features_rows_sha256 == digests[CUT]
        assert entry.features_rows_sha256 == digests[5135]
        assert Manifest.read(path.parent, REPO).entries[path.name] == entry
        assert_exports_match(path.parent, path.name, 3, dedup, {"index-json", "tensor"})
        if dedup and not fixed:  # the case the README warns about: a kept 3-code SID prefixes a new 4-code one
            assert any(len(a) == 3 and b[:3] == a for a in want[:CUT] for b in want[CUT:])
    if not dedup:  # without dedup codes, extending gives the very file a full run writes
        full, _, _ = _run(nyc["full"], tmp_path / "whole", replace(spec, keep_existing=False))
        for spec_ in SPECS:
            assert _file(tmp_path, spec_).read_bytes() == _file(tmp_path / "whole", spec_).read_bytes()


def test_a_file_of_every_poi_is_kept_whole_without_encoding(nyc, demo_hub, tmp_path):
    """The same POIs in another file format: nothing to encode, the file is published again as it was."""
    spec = OutputSpec(keep_existing=True)
    first, _, _ = _run(nyc["cut"], tmp_path, spec, SPECS[:1])
    before = _file(tmp_path, SPECS[0]).read_bytes()
    hub = _parquet_hub(demo_hub, tmp_path / "parquet", nyc["features"][:CUT])
    again, _, first_pid = _run(hub, tmp_path, spec, SPECS[:1])
    assert first_pid == CUT + 1
    entry = again[SPECS[0].model_id].entry
    assert _file(tmp_path, SPECS[0]).read_bytes() == before and entry.sha256 == first[SPECS[0].model_id].entry.sha256
    assert entry.extends == ExtendedFile(entry.sha256, CUT)


def _changed_hub(nyc, demo_hub, root: Path, rows: dict[int, int]) -> Path:
    """The full hub with the features of Pid ``p`` replaced by those of Pid ``rows[p]``."""
    features = nyc["features"].copy()
    for pid, source in rows.items():
        features[pid - 1] = features[source - 1]
    return _hub(demo_hub, root, features)


def test_kept_pois_that_would_get_another_sid_are_refused_with_their_count(nyc, demo_hub, tmp_path):
    spec = OutputSpec(dedup=True, keep_existing=True)
    _run(nyc["cut"], tmp_path, spec, SPECS[:1])
    path = _file(tmp_path, SPECS[0])
    before = path.read_bytes()
    codes = nyc["codes"][SPECS[0].model_id]
    moved = {11: 3011, 12: 3012, 700: 3700, 2999: 5000}  # the features of new POIs, most with other SIDs
    moved = {pid: src for pid, src in moved.items() if codes[src - 1] != codes[pid - 1]}
    assert len(moved) >= 2
    hub = _changed_hub(nyc, demo_hub, tmp_path / "changed", moved)
    results, notes, first_pid = _run(hub, tmp_path, spec, SPECS[:1])
    assert first_pid == 1 and any("changed since it was written; encoding them again" in n for n in notes)
    assert results[SPECS[0].model_id] == Refused(
        SPECS[0].model_id,
        f"{len(moved)} POI(s) already in {path.name} now get another SID (first Pid {min(moved)}): their features "
        "changed since it was written; --force redoes the file from scratch",
    )
    assert path.read_bytes() == before  # and nothing else was left beside it
    prefixes = path.name.replace(".csv", ".prefixes.json")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, MANIFEST_FILE, prefixes])


def test_changed_features_that_keep_every_sid_extend_the_file(nyc, demo_hub, tmp_path):
    spec = OutputSpec(keep_existing=True)
    _run(nyc["cut"], tmp_path, spec, SPECS[:1])
    path = _file(tmp_path, SPECS[0])
    before = path.read_bytes()
    codes, features = nyc["codes"][SPECS[0].model_id], nyc["features"]
    new_by_sid = {tuple(code): pid for pid, code in enumerate(codes[CUT:], CUT + 1)}
    same = next(
        (pid, new_by_sid[tuple(code)])
        for pid, code in enumerate(codes[:CUT], 1)
        if tuple(code) in new_by_sid and not np.array_equal(features[pid - 1], features[new_by_sid[tuple(code)] - 1])
    )
    hub = _changed_hub(nyc, demo_hub, tmp_path / "changed", dict([same]))
    results, notes, first_pid = _run(hub, tmp_path, spec, SPECS[:1])
    assert first_pid == 1 and any("changed since it was written; encoding them again" in n for n in notes)
    assert isinstance(results[SPECS[0].model_id], Published)
    assert path.read_bytes()[: len(before)] == before
    assert _codebooks(path) == codes


def test_files_that_cannot_be_kept_are_refused_before_any_work(nyc, demo_hub, tmp_path):
    spec = OutputSpec(keep_existing=True)
    _run(nyc["full"], tmp_path / "full", spec, SPECS[:1])
    _run(nyc["cut"], tmp_path / "cut", spec, SPECS[:1])
    model = SPECS[0].model_id

    def refusal(hub: Path, out: Path, asked: OutputSpec = spec) -> str:
        results, _, _ = _run(hub, out, asked, SPECS[:1])
        return results[model]

    assert "it holds 5135 POIs but the dataset has only 3000" in refusal(nyc["cut"], tmp_path / "full")
    assert "written with --dedup off; run with its options, or --force" in refusal(
        nyc["full"], tmp_path / "cut", replace(spec, dedup=True)
    )
    other = _hub(demo_hub, tmp_path / "other", nyc["features"], {SPECS[0]: SPECS[1]})
    assert "made with another checkpoint" in refusal(other, tmp_path / "cut")
    path = _file(tmp_path / "cut", SPECS[0])
    path.write_bytes(path.read_bytes().replace(b"\n2,", b"\n2 ,", 1))
    assert "its bytes differ from the manifest's sha256" in refusal(nyc["full"], tmp_path / "cut")
    (path.parent / MANIFEST_FILE).unlink()
    assert "the manifest beside it does not describe it; use --force" in refusal(nyc["full"], tmp_path / "cut")


def test_when_only_uploading_the_published_file_is_downloaded(tmp_path, monkeypatch):
    folder = tmp_path / "hub" / "datasets" / "org" / "nyc" / BASE / "Intermediate Files"
    folder.mkdir(parents=True)
    (folder / "codebooks-m.csv").write_bytes(b'Pid,Codebook,Vector\n1,"[1, 2, 3]","[0.5]"\n')
    manifest = Manifest(folder, "org/nyc")
    entry = {"file": "codebooks-m.csv", "model_id": "org/m", "format": "csv", "dedup": False, "sid_tokens": False}
    manifest.entries["codebooks-m.csv"] = ManifestEntry(**entry, rows=1, sha256=sha256_files([folder / entry["file"]]))
    manifest.write()
    with HubServer(tmp_path / "hub", objects_dir=tmp_path / "objects", token="hf_test") as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        found = find_published(None, LocalHub(tmp_path / "hub"), "org/nyc", BASE, "codebooks-m.csv")
        assert found.path.read_bytes() == (folder / "codebooks-m.csv").read_bytes()
        assert found.entry == manifest.entries["codebooks-m.csv"]
        assert find_published(None, HfHub(), "org/nyc", BASE, "codebooks-other.csv") is None


def test_the_python_api_takes_the_same_options():
    with pytest.raises(OutputError, match="--keep-existing keeps a published file and --force redoes it"):
        BatchInferenceProcessor(out_dir="out", keep_existing=True, force=True)
    with pytest.raises(OutputError, match="needs --dedup"):
        BatchInferenceProcessor(out_dir="out", fixed_length=True)
    with pytest.raises(OutputError, match="--min-actors 3 is larger than --max-actors 2"):
        BatchInferenceProcessor(out_dir="out", min_actors=3, max_actors=2)
    options = BatchInferenceProcessor(out_dir="out", dedup=True, fixed_length=True, exports=["tensor"]).options
    assert options.output == OutputSpec(dedup=True, fixed_length=True, exports=frozenset({Export.TENSOR}))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fixed-length"], "--fixed-length gives every POI a dedup code, so it needs --dedup; add --dedup"),
        (["--keep-existing", "--force"], "--keep-existing keeps a published file and --force redoes it"),
        (["--export", "index-json,bogus"], "--export 'bogus' is not an export; choose from index-json, tensor"),
    ],
)
def test_contradictory_or_unknown_options_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(app, ["--hub-dir", str(tmp_path), "--out-dir", str(tmp_path / "out"), "--debug", *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def _parquet_hub(demo_hub: Path, root: Path, features: np.ndarray) -> Path:
    """``features`` as Parquet shards of 1,300 rows (Pid 3,001 falls inside the third)."""
    _hub(demo_hub, root, features)
    base = root / "datasets" / REPO / "RQVAE Dataset"
    (base / "poi_features.pt").unlink()
    (base / "poi_features").mkdir()
    for part, start in enumerate(range(0, len(features), 1300)):
        stop = min(start + 1300, len(features))
        table = sparse_table(SparseRows.from_dense(features[start:stop]), first_pid=start + 1)
        pq.write_table(table, base / "poi_features" / f"part-{part:05d}.parquet")
    return root


def test_keep_existing_on_ray(nyc, demo_hub, local_ray, tmp_path):
    """Through Ray: the cut .pt dataset, then the full one as Parquet shards (only the shards from Pid 3,001 read)."""
    spec = OutputSpec(dedup=True, sid_tokens=True, exports=EXPORTS, keep_existing=True)
    out, notes = tmp_path / "out", []
    for hub in (nyc["cut"], _parquet_hub(demo_hub, tmp_path / "parquet", nyc["features"])):
        old = {s.model_id: _file(out, s).read_bytes() for s in SPECS if _file(out, s).is_file()}
        options = RunOptions(hub=LocalHub(hub), out_dir=str(out), output=spec, executor=ExecutorMode.RAY)
        results = run_models(SPECS, options, Progress(notes.append))
        assert all(r.ok for r in results), [r.error for r in results]
    # The Parquet shards' digest of Pids 1..3000 is the .pt file's: only Pids 3001.. went through Ray.
    assert sum(f"keeping the {CUT} POIs" in note for note in notes) == len(SPECS)
    for spec_ in SPECS:
        path, codes = _file(out, spec_), nyc["codes"][spec_.model_id]
        assert path.read_bytes()[: len(old[spec_.model_id])] == old[spec_.model_id]
        assert _codebooks(path) == extended_rule(dedup_rule(codes[:CUT]), codes[CUT:])
        assert Manifest.read(path.parent, REPO).entries[path.name].extends.rows == CUT
        assert_exports_match(path.parent, path.name, 3, True, {"index-json", "tensor"})


def test_the_features_digest_is_canonical_and_blind_to_blocks(monkeypatch):
    rows = SparseRows(np.array([0, 2, 3]), np.array([1, 4, 0]), None)
    features = PoiFeatures("org/nyc", 5, 2, "", "", rows=rows)

    def digest(counts: list[int], indices: list[int]) -> str:
        streams = [np.array(counts, "<u4"), np.array(indices, "<i4"), np.ones(len(indices), "<f4")]
        return hashlib.sha256(b"".join(hashlib.sha256(s.tobytes()).digest() for s in streams)).hexdigest()

    want = {0: digest([], []), 1: digest([2], [1, 4]), 2: digest([2, 1], [1, 4, 0])}
    assert rows_digests(features, [0, 1, 2]) == want
    monkeypatch.setattr(feature_digest, "BLOCK_ROWS", 1)
    assert rows_digests(features, [2, 1]) == {1: want[1], 2: want[2]}
    valued = replace(features, rows=replace(rows, values=np.ones(3, np.float32)))  # ones spelled out: the same
    assert rows_digests(valued, [2]) == {2: want[2]}
    scaled = replace(features, rows=replace(rows, values=np.array([1, 2, 1], np.float32)))
    assert rows_digests(scaled, [2])[2] != want[2]
