"""``--for`` presets on the bundled NYC data, in-process: each trainer's reading of its files, re-done here from its
public loader (file and function named in each test), gives every POI the SID of the codebooks file, under the item
id the README documents; the files are in the manifest with their sha256, in ``--summary-json`` and in the upload
commit; contradicting options are refused."""

from __future__ import annotations

import csv
import json
import os
import shutil
from ast import literal_eval
from collections import Counter
from pathlib import Path

import pytest
import torch

from rqvae_ray import read_codebooks
from rqvae_ray.cli.summary import write_summary_json
from rqvae_ray.core.contract import Export
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.core.presets import Preset, too_many_codes, variable_length_warning
from rqvae_ray.errors import OutputError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.outputs.manifest import Manifest, Provenance, check_existing
from rqvae_ray.pipeline.options import make_options
from rqvae_ray.pipeline.progress import Quiet
from rqvae_ray.runner import run_models
from tests.conftest import run_cli, use_hub
from tests.core.test_checkpoint_safety import fitted, run_in_process, small_hub, with_codebooks
from tests.hub_server import HubServer

SPEC = parse_model_id(DEFAULT_MODELS[2])  # an NYC model
REPO = "comp5331poi/nyc"
IN_REPO = "LLM Dataset/Intermediate Files"
STEM = f"codebooks-{SPEC.name}"
ITEMS_JSON = f"{STEM.replace('.', '_')}-items.index.json"
FIXED = "lc-rec,minionerec,tiger,grid,sid-gr"
EOS = "</s>"


def _run(demo_hub: Path, out: Path, presets: str, **options):
    options = make_options(hub_dir=demo_hub, out_dir=out, executor="local", for_=presets, **options)
    result = run_models([SPEC], options, Quiet())[0]
    assert result.ok, result.error
    return result


def _folder(out: Path) -> Path:
    return out / "datasets" / REPO / IN_REPO


def _codes(folder: Path) -> list[list[int]]:
    """Every POI's SID in the codebooks file, in Pid order (Pids 1..N)."""
    frame = read_codebooks(folder / f"{STEM}.csv")
    assert frame["Pid"].tolist() == list(range(1, len(frame) + 1))
    return [list(code) for code in frame["Codebook"]]


def _tokens(code: list[int]) -> list[str]:
    return [f"<{'abcde'[level]}_{value}>" for level, value in enumerate(code)]


@pytest.fixture(scope="module")
def fixed_run(demo_hub, tmp_path_factory):
    """One run for every preset that decodes a fixed number of codes (and MiniOneRec): (folder, result)."""
    out = tmp_path_factory.mktemp("fixed")
    return _folder(out), _run(demo_hub, out, FIXED)


@pytest.fixture(scope="module")
def gnpr_run(demo_hub, tmp_path_factory):
    """One run for both GNPR-SID presets, with --export index-json (variable length): (folder, result)."""
    out = tmp_path_factory.mktemp("gnpr")
    return _folder(out), _run(demo_hub, out, "gnpr-sid,gnpr-sid-v2", exports="index-json")


def _lc_rec_ungenerable(indices: dict[str, list[str]]) -> int:
    """LC-Rec's data.py get_prefix_allowed_tokens_fn: one set of tokens per position, then EOS at the position after
    the longest; the SIDs whose EOS position is never allowed cannot be generated."""
    allowed: dict[int, set[str]] = {}
    for index in indices.values():
        for position, token in enumerate(index):
            allowed.setdefault(position, set()).add(token)
    allowed[len(allowed)] = {EOS}
    return sum(1 for index in indices.values() if EOS not in allowed[len(index)])


def test_lc_rec_and_minionerec_read_the_0_based_index_map(fixed_run, tmp_path):
    folder, _ = fixed_run
    codes = _codes(folder)
    path = folder / ITEMS_JSON
    # LC-Rec data.py BaseDataset._load_data: <data_path>/<dataset>/<dataset><index_file>, index_file ".index.json".
    dataset = tmp_path / "NYC"
    dataset.mkdir()
    shutil.copy(path, dataset / "NYC.index.json")
    indices = json.loads((tmp_path / "NYC" / ("NYC" + ".index.json")).read_text())
    # _remap_items: indices[str(item)] for the 0-based item ids of its .inter.json: item = Pid - 1.
    assert [indices[str(pid - 1)] for pid in range(1, len(codes) + 1)] == [_tokens(code) for code in codes]
    assert {len(index) for index in indices.values()} == {4}
    assert _lc_rec_ungenerable(indices) == 0
    # MiniOneRec sft.py: TokenExtender(data_path=dirname(p), dataset=basename(p).split(".")[0]) opens
    # <data_path>/<dataset>.index.json, which must be the file given.
    opened = Path(os.path.dirname(path)) / (os.path.basename(path).split(".")[0] + ".index.json")
    assert opened == path
    tokens = sorted({token for index in json.loads(opened.read_text()).values() for token in index})
    assert {token[:3] for token in tokens} == {"<a_", "<b_", "<c_", "<d_"}


def test_tiger_reads_items_first_tensor_with_its_dedup_rule(fixed_run):
    folder, _ = fixed_run
    codes = _codes(folder)
    # EdoardoBotta/RQ-VAE-Recommender semids.py: cached_ids [N, levels + 1], rows indexed by item id (Pid - 1).
    cached = torch.load(folder / f"{STEM}.tiger.pt", weights_only=True)
    assert cached.dtype == torch.int64 and tuple(cached.shape) == (len(codes), 4)
    assert cached.tolist() == codes
    # precompute_corpus_ids: the last code counts the earlier items with the same first three codes.
    seen: Counter = Counter()
    for row in cached.tolist():
        assert row[3] == seen[tuple(row[:3])]
        seen[tuple(row[:3])] += 1


def test_grid_and_sid_gr_read_the_levels_first_tensor(fixed_run):
    folder, _ = fixed_run
    codes = _codes(folder)
    id_map = torch.load(folder / f"{STEM}.sids.pt", weights_only=True)
    items = torch.arange(len(codes))  # item id = Pid - 1
    # GRID pre_processing.map_sparse_id_to_semantic_id: id_map is D x N, read as id_map.t()[item ids].
    assert id_map.t()[items].tolist() == codes
    # GRID tensor_utils.deduplicate_rows_in_tensor on the first three codes gives the same last code.
    base = id_map[:3].t()
    _, inverse = torch.unique(base, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)
    dedup = torch.zeros_like(inverse)
    for i in range(1, len(order)):
        if inverse[order[i]] == inverse[order[i - 1]]:
            dedup[order[i]] = dedup[order[i - 1]] + 1
    assert dedup.tolist() == id_map[3].tolist()
    # SID-GR sid_sequence_dataset.py: rows == num_hierarchies, index_select by item id, then codebook offsets; every
    # token must stay within its level's range (a -1 would fall into the level before).
    sizes = [32, 32, 32, int(id_map[3].max()) + 1]
    assert id_map.shape[0] == len(sizes)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0)[:-1].tolist()])
    history = torch.index_select(id_map, dim=1, index=items).transpose(0, 1) + offsets.unsqueeze(0)
    assert history.tolist() == [[c + o for c, o in zip(code, offsets.tolist(), strict=True)] for code in codes]
    assert ((history >= offsets) & (history < offsets + torch.tensor(sizes))).all()


def test_gnpr_sid_files_follow_the_authors_numbering(gnpr_run, capsys):
    folder, _ = gnpr_run
    codes = _codes(folder)
    # V1 code/codebook.py: Pid,Codebook,Vector; a POI gets an extra code 0, 1, ... (in Pid order) only when its SID
    # is shared.
    assert (folder / f"{STEM}.csv").read_bytes().startswith(b"Pid,Codebook,Vector\n")
    base = [tuple(code[:3]) for code in codes]
    counts, seen = Counter(base), Counter()
    for sid, code in zip(base, codes, strict=True):
        if counts[sid] > 1:
            assert code == [*sid, seen[sid]]
            seen[sid] += 1
        else:
            assert code == list(sid)
    # V2 get_sft_data.ipynb load_pid_to_code: pd.read_csv(...)["pid"], literal_eval(row["sid"]), at most 4 codes.
    with (folder / f"{STEM}.gnpr-sid-v2.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["pid", "sid", "vector"]
    assert [int(row["pid"]) for row in rows] == list(range(1, len(codes) + 1))
    assert [literal_eval(row["sid"]) for row in rows] == codes
    assert max(len(code) for code in codes) <= 4
    v2_lines = (folder / f"{STEM}.gnpr-sid-v2.csv").read_bytes().split(b"\n", 1)[1]
    assert v2_lines == (folder / f"{STEM}.csv").read_bytes().split(b"\n", 1)[1]
    # Variable-length SIDs are what LC-Rec's position-wise decoding cannot generate: the reason for the warning.
    indices = json.loads((folder / f"{STEM}.index.json").read_text())
    assert _lc_rec_ungenerable(indices) > 0
    assert not (folder / ITEMS_JSON).exists() and not (folder / f"{STEM}.sids.pt").exists()


def test_preset_files_are_in_the_manifest_and_the_summary(fixed_run, tmp_path):
    folder, result = fixed_run
    entry = Manifest.read(folder, REPO).entries[f"{STEM}.csv"]
    assert entry.dedup and entry.fixed_length
    kinds = {record.kind: record for record in entry.exports}
    assert set(kinds) == {"tensor", "prefixes", "items-index-json", "tiger-tensor"}
    assert kinds["items-index-json"].file == ITEMS_JSON and kinds["tiger-tensor"].file == f"{STEM}.tiger.pt"
    for record in entry.exports:
        assert sha256_files([folder / record.file]) == record.sha256
    listed = {f.name for f in folder.iterdir()}
    assert listed == {f"{STEM}.csv", "rqvae_ray-manifest.json", *(r.file for r in entry.exports)}
    summary = write_summary_json(tmp_path / "summary.json", [result], 0, "ok", "")
    model = json.loads(summary.read_text())["models"][0]
    assert model["exports"] == [{"kind": r.kind, "file": r.file, "sha256": r.sha256} for r in entry.exports]


def test_changing_the_presets_redoes_the_file_and_drops_the_old_ones(demo_hub, tmp_path):
    _run(demo_hub, tmp_path, "lc-rec")
    folder = _folder(tmp_path)
    entry = Manifest.read(folder, REPO).entries[f"{STEM}.csv"]
    assert (folder / ITEMS_JSON).is_file()
    grid = make_options(hub_dir=demo_hub, out_dir=tmp_path, for_="grid").output
    provenance = Provenance(
        entry.checkpoint_sha256, entry.checkpoint_revision, entry.features_sha256, entry.features_revision
    )
    stale = check_existing(folder, entry.file, grid, provenance, REPO).stale
    assert stale == "it was written with other exports (now tensor, prefixes)"
    _run(demo_hub, tmp_path, "grid")
    assert not (folder / ITEMS_JSON).exists() and (folder / f"{STEM}.sids.pt").is_file()
    assert [r.kind for r in Manifest.read(folder, REPO).entries[entry.file].exports] == ["tensor", "prefixes"]


def test_preset_files_are_in_the_upload_commit(demo_hub, tmp_path, monkeypatch):
    root = tmp_path / "remote"
    shutil.copytree(demo_hub / "datasets" / REPO, root / "datasets" / REPO)
    token = "hf_presets0123456789abcdefTOKEN"
    with HubServer(root, objects_dir=tmp_path / "objects", token=token) as server:
        use_hub(monkeypatch, server.url, tmp_path / "hf_cache", token)
        options = make_options(hub_dir=demo_hub, executor="local", for_="minionerec,tiger")
        result = run_models([SPEC], options, Quiet())[0]
        assert result.ok, result.error
        (commit,) = [c for c in server.commits if c["repo_id"] == REPO]
        names = [f"{STEM}.csv", f"{STEM}.prefixes.json", ITEMS_JSON, f"{STEM}.tiger.pt", "rqvae_ray-manifest.json"]
        assert sorted(commit["paths"]) == sorted(f"{IN_REPO}/{name}" for name in names)
        assert [r.file for r in result.exports] == names[1:4]


def test_presets_turn_on_what_their_trainers_need():
    lc_rec = make_options(out_dir="o", for_="lc-rec").output
    assert lc_rec.dedup and lc_rec.fixed_length and lc_rec.presets == {Preset.LC_REC}
    assert make_options(out_dir="o", for_=["grid"]).output.exports == {Export.TENSOR}
    gnpr = make_options(out_dir="o", for_="gnpr-sid").output
    assert gnpr.dedup and not gnpr.fixed_length and gnpr.preset_files == ()
    assert make_options(out_dir="o", for_="minionerec,lc-rec").output.preset_files == (
        make_options(out_dir="o", for_="lc-rec").output.preset_files
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"for_": "gnpr-sid", "dedup": True, "fixed_length": True},
            "--for gnpr-sid numbers only .* and --fixed-length",
        ),
        ({"for_": "gnpr-sid-v2,lc-rec"}, "--for gnpr-sid-v2 numbers only .* and --for lc-rec decodes a fixed number"),
        ({"for_": "gnpr-sid", "fmt": "parquet"}, "--for gnpr-sid reads the codebooks CSV and --format parquet"),
        ({"for_": "lc-rec,tigre"}, "--for 'tigre' is not a preset; choose from gnpr-sid, gnpr-sid-v2, lc-rec"),
    ],
)
def test_contradicting_options_are_refused_naming_both(options, message):
    with pytest.raises(OutputError, match=message):
        make_options(out_dir="o", **options)


def test_variable_length_exports_warn_naming_the_trainers():
    warning = variable_length_warning(frozenset({"index-json", "prefixes"}), fixed_length=False)
    assert "LC-Rec, TIGER, GRID, NVIDIA SID-GR" in warning and warning.startswith("--export index-json without")
    assert variable_length_warning(frozenset({"tensor"}), fixed_length=True) == ""
    assert variable_length_warning(frozenset({"prefixes"}), fixed_length=False) == ""
    from rqvae_ray.api.batch_inference import BatchInferenceProcessor

    with pytest.warns(UserWarning, match="--export tensor without --fixed-length"):
        BatchInferenceProcessor(out_dir="o", exports="tensor", dedup=True)


def test_the_command_line_takes_for_and_warns_once(tmp_path):
    refused = run_cli("--out-dir", str(tmp_path), "--for", "gnpr-sid,tiger")
    assert refused.returncode == 2
    assert "--for gnpr-sid numbers only POIs that share an SID" in refused.stderr and "--for tiger" in refused.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    # The warning comes with the options, before the unwritable --out-dir stops the run.
    warned = run_cli(DEFAULT_MODELS[2], "--out-dir", str(blocked / "out"), "--export", "tensor")
    assert warned.returncode == 2
    assert warned.stderr.count("warning: --export tensor without --fixed-length: LC-Rec, TIGER") == 1


def test_sids_longer_than_a_trainer_takes_are_named():
    gnpr_v2 = frozenset({Preset.GNPR_SID_V2})
    assert too_many_codes(gnpr_v2, 3, dedup=True) == ""
    assert too_many_codes(frozenset({Preset.GNPR_SID, Preset.LC_REC}), 7, dedup=True) == ""
    assert too_many_codes(gnpr_v2, 4, dedup=True) == (
        "--for gnpr-sid-v2: GNPR-SID V2 takes SIDs of at most 4 codes (encode_item in get_sft_data.ipynb "
        "refuses a longer one and load_pid_to_code skips its POI) but this model's 4 quantizer levels and the dedup "
        "code give SIDs of up to 5; run this model without --for gnpr-sid-v2, or give a checkpoint of at most 3 "
        "levels"
    )


def test_gnpr_sid_v2_fails_a_model_of_4_levels_before_any_work(tmp_path, capfd):
    """GNPR-SID V2's encode_item (get_sft_data.ipynb) skips an SID of more than 4 codes: a 4-level model, whose
    shared SIDs get a 5th (dedup) code, fails with one line before it is encoded; a 3-level one in the run succeeds."""
    shallow, deep = DEFAULT_MODELS[:2]  # NYC models
    four = with_codebooks(fitted(deep), lambda books: [*books, books[-1][:4] * 0.5])
    hub = small_hub(tmp_path / "hub", {shallow: fitted(shallow), deep: four})
    out = tmp_path / "out"
    status, output = run_in_process(hub, out, capfd, "--for", "gnpr-sid-v2", shallow, deep)
    assert status == 1, output
    refusals = [line for line in output.splitlines() if line.startswith("error: ")]
    assert refusals == [f"error: {deep}: " + too_many_codes(frozenset({Preset.GNPR_SID_V2}), 4, dedup=True)]
    assert f"{deep}: published checkpoint" not in output  # refused before it was taken to encode
    assert f"{shallow}: published checkpoint" in output
    folder = _folder(out)
    kept = f"codebooks-{parse_model_id(shallow).name}"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["rqvae_ray-manifest.json", f"{kept}.csv", f"{kept}.prefixes.json", f"{kept}.gnpr-sid-v2.csv"]
    )
    assert list(Manifest.read(folder, REPO).entries) == [f"{kept}.csv"]
