"""Several writer actors per dataset: the files of different models written side by side by different actors give
the same bytes and one manifest; an upload-only run makes one commit per dataset repo, with the files written on
other nodes pre-uploaded there."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_ids
from rqvae_ray.outputs.layout import MANIFEST_FILE, codebooks_filename, output_dir
from rqvae_ray.outputs.manifest import Manifest
from rqvae_ray.outputs.writer import commit_dataset
from rqvae_ray.pipeline.options import make_options
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.ray_backend import plan
from rqvae_ray.runner import run_models
from tests.conftest import use_hub
from tests.hub_server import HubServer

TOKEN = "hf_writers0123456789abcdefTESTtoken"
IN_REPO = "LLM Dataset/Intermediate Files"


@pytest.fixture()
def several_writers(monkeypatch):
    """Plans that give each dataset as many writers as the CPUs allow, whatever its size (two per dataset on a
    2-CPU Ray running two datasets; the plan is made in this process, the driver)."""
    monkeypatch.setattr(plan, "SID_ROWS_PER_WRITER", 1)
    monkeypatch.setattr(plan, "CPUS_PER_WRITER", 0.5)


def _demo_folder(out: Path, dataset: str) -> Path:
    return output_dir(out, f"comp5331poi/{dataset}", "LLM Dataset")


def test_several_writers_per_dataset_write_the_same_bytes_and_one_manifest(
    demo_hub, demo_run, local_ray, several_writers, tmp_path
):
    demo_out, _ = demo_run
    specs = parse_model_ids(list(DEFAULT_MODELS))
    notes: list[str] = []
    options = make_options(hub_dir=demo_hub, out_dir=tmp_path, executor="ray", batch_size=512)
    results = run_models(specs, options, Progress(notes.append))
    assert all(r.ok for r in results), [r.error for r in results]
    assert sum("2 writer(s) on the driver's node" in note for note in notes) == 2, notes
    for spec in specs:
        name = codebooks_filename(spec.name, OutputFormat.CSV)
        got, want = _demo_folder(tmp_path, spec.dataset) / name, _demo_folder(demo_out, spec.dataset) / name
        assert got.read_bytes() == want.read_bytes(), name
    # Each dataset's writers entered their models in the one manifest of its folder, none lost to another.
    for dataset in ("nyc", "tky"):
        entries = Manifest.read(_demo_folder(tmp_path, dataset), f"comp5331poi/{dataset}").entries
        assert sorted(entries) == sorted(
            codebooks_filename(s.name, OutputFormat.CSV) for s in specs if s.dataset == dataset
        )


@pytest.mark.parametrize("several", [False, True])
def test_a_private_ray_writes_in_the_driver_unless_a_dataset_needs_several_writers(
    demo_hub, demo_run, local_ray, tmp_path, monkeypatch, several
):
    """On a Ray this run started itself, a dataset that one writer serves is written in the driver (no writer actor
    to start); one planned for several writers still gets writer actors. The same bytes either way."""
    import ray

    from rqvae_ray.ray_backend import executor, writing
    from rqvae_ray.ray_backend.cluster import ClusterShape
    from rqvae_ray.ray_backend.writing import _start_writer

    if several:
        monkeypatch.setattr(plan, "SID_ROWS_PER_WRITER", 1)
        monkeypatch.setattr(plan, "CPUS_PER_WRITER", 0.5)
    # The shared test Ray, taken for one that this run started (private) with its 2 CPUs.
    monkeypatch.setattr(executor, "start_ray", lambda _address: ClusterShape(2.0, 0.0, private=True, driver_cpus=2.0))
    started: list = []
    monkeypatch.setattr(writing, "_start_writer", lambda node=None: started.append(_start_writer(node)) or started[-1])
    demo_out, _ = demo_run
    specs = parse_model_ids([*DEFAULT_MODELS[0:2], *DEFAULT_MODELS[5:7]])  # two models per dataset
    notes: list[str] = []
    options = make_options(hub_dir=demo_hub, out_dir=tmp_path, executor="ray", batch_size=512)
    results = run_models(specs, options, Progress(notes.append))
    assert all(r.ok for r in results), [r.error for r in results]
    in_driver = [note for note in notes if "written in this process" in note]
    assert len(in_driver) == (0 if several else 2), notes
    assert bool(started) is several  # writer actors only for several writers
    for spec in specs:
        name = codebooks_filename(spec.name, OutputFormat.CSV)
        got, want = _demo_folder(tmp_path, spec.dataset) / name, _demo_folder(demo_out, spec.dataset) / name
        assert got.read_bytes() == want.read_bytes(), name
    assert ray.is_initialized()


@pytest.fixture()
def server(demo_hub, tmp_path, monkeypatch):
    """A stand-in Hub holding the NYC dataset repo, with this process's huggingface_hub pointed at it; files over
    300 kB go to its (HTTP) LFS storage."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the stand-in speaks HTTP LFS, not Xet
    root = tmp_path / "remote"
    shutil.copytree(demo_hub / "datasets" / "comp5331poi" / "nyc", root / "datasets" / "comp5331poi" / "nyc")
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN, lfs_threshold=300_000) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_cache", TOKEN)
        yield hub


def test_an_upload_only_run_of_several_writers_makes_one_commit(demo_hub, demo_run, local_ray, several_writers, server):
    """The local Ray's workers started before this test set HF_TOKEN, so no writer's node has a token: each writer
    is started again on the driver's node, and the driver commits the files it finds there."""
    demo_out, _ = demo_run
    specs = parse_model_ids([m for m in DEFAULT_MODELS if "nyc" in m][:4])
    notes: list[str] = []
    options = make_options(hub_dir=demo_hub, upload=True, executor="ray", upload_retries=0)
    results = run_models(specs, options, Progress(notes.append))
    assert all(r.ok for r in results), [r.error for r in results]
    assert any("writer(s) spread over the cluster" in note and "nyc" in note for note in notes), notes
    assert len(server.commits) == 1 and all(r.commit == server.commits[0]["oid"] for r in results), server.commits
    stored = server.repo_dir("comp5331poi/nyc", "dataset") / IN_REPO
    for spec in specs:
        name = codebooks_filename(spec.name, OutputFormat.CSV)
        assert (stored / name).read_bytes() == (_demo_folder(demo_out, "nyc") / name).read_bytes(), name
    committed = json.loads((stored / MANIFEST_FILE).read_text())["files"]
    assert sorted(committed) == sorted(codebooks_filename(s.name, OutputFormat.CSV) for s in specs)


def test_files_preuploaded_by_another_process_go_in_one_commit(server, demo_run, tmp_path):
    """What a writer on another node does: large files go to the Hub's storage ahead of the commit, small ones travel
    in their operation; the commit, made elsewhere, needs none of the writer's files."""
    from rqvae_ray.outputs.upload import Preuploaded, preupload_files

    demo_out, _ = demo_run
    folder = _demo_folder(demo_out, "nyc")
    entries = list(Manifest.read(folder, "comp5331poi/nyc").entries.values())[:2]
    writer_folder = tmp_path / "writer"
    writer_folder.mkdir()
    files = []
    for entry in entries:
        shutil.copy(folder / entry.file, writer_folder / entry.file)
        files.append((writer_folder / entry.file, f"{IN_REPO}/{entry.file}"))
    small = writer_folder / "small.json"
    small.write_text('{"a": 1}')
    files.append((small, f"{IN_REPO}/small.json"))
    operations = pickle.loads(pickle.dumps(preupload_files("comp5331poi/nyc", files)))  # as Ray sends them
    uploads = [path for method, path, status in server.requests if method == "PUT" and status == 200]
    assert len(uploads) == 2, server.requests  # the two codebooks files (over the LFS threshold), not small.json
    shutil.rmtree(writer_folder)
    preuploaded = [Preuploaded(operations, "elsewhere")]
    oid = commit_dataset("comp5331poi/nyc", "LLM Dataset", entries, "preuploaded", 0, 0.0, preuploaded=preuploaded)
    assert len(server.commits) == 1 and server.commits[0]["oid"] == oid
    stored = server.repo_dir("comp5331poi/nyc", "dataset") / IN_REPO
    for entry in entries:
        assert (stored / entry.file).read_bytes() == (folder / entry.file).read_bytes()
    assert (stored / "small.json").read_text() == '{"a": 1}'
    assert sorted(json.loads((stored / MANIFEST_FILE).read_text())["files"]) == sorted(e.file for e in entries)


def test_a_writer_pinned_to_a_node_that_is_gone_is_replaced(local_ray):
    """Upload-only writers are pinned to their nodes: one whose node left the cluster since the listing cannot start,
    and counts as a node without a token (a writer on the driver's node takes its models)."""
    from rqvae_ray.ray_backend.writing import _start_writer, _token_there

    gone = _start_writer("ab" * 28)
    assert _token_there(gone.token_here.remote()) is False
    here = _start_writer()
    try:
        assert _token_there(here.token_here.remote()) == local_ray.get(here.token_here.remote())
    finally:
        local_ray.kill(here)
