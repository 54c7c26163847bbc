"""``--upload`` with files up to date in ``--out-dir``: up to date means up to date where the run publishes. A file the
dataset repo lacks (or holds in another version) is uploaded as it is, without encoding, in the dataset's one commit;
one the repo holds is skipped; ``--out-dir`` alone never asks the Hub."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from rqvae_ray.core.contract import OutputFormat
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, ModelSpec, parse_model_id
from rqvae_ray.outputs.layout import MANIFEST_FILE, codebooks_filename, output_dir
from rqvae_ray.pipeline.options import make_options
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.pipeline.results import ModelResult
from rqvae_ray.runner import run_models
from tests.conftest import use_hub
from tests.hub_server import HubServer

TOKEN = "hf_freshness0123456789abcdefTESTtoken"
REPO_ID = "comp5331poi/nyc"
SPECS = [parse_model_id(DEFAULT_MODELS[0]), parse_model_id(DEFAULT_MODELS[2])]  # two NYC models
IN_REPO = "LLM Dataset/Intermediate Files"


@pytest.fixture()
def server(demo_hub, tmp_path, monkeypatch):
    """A stand-in Hub holding the NYC dataset repo, where the runs upload (they read the demo hub), with this
    process's huggingface_hub pointed at it."""
    root = tmp_path / "remote"
    shutil.copytree(demo_hub / "datasets" / "comp5331poi" / "nyc", root / "datasets" / "comp5331poi" / "nyc")
    with HubServer(root, objects_dir=tmp_path / "objects", token=TOKEN) as hub:
        use_hub(monkeypatch, hub.url, tmp_path / "hf_cache", TOKEN)
        yield hub


@pytest.fixture()
def run(demo_hub) -> Callable[..., tuple[list[ModelResult], list[str]]]:
    """``run(out, specs, upload=..., executor=...)``: one run of ``specs`` on the demo hub into ``out`` (and the
    dataset repo with ``upload``); its results and its notes."""

    def run(out: Path, specs: list[ModelSpec], *, upload: bool, executor: str = "local"):
        notes: list[str] = []
        options = make_options(
            hub_dir=demo_hub, out_dir=out, upload=upload, executor=executor, exports="index-json", upload_retries=0
        )
        return run_models(specs, options, Progress(notes.append)), notes

    return run


def _names(out: Path, spec: ModelSpec) -> list[str]:
    """A model's codebooks file in ``out`` and the files exported beside it (as its manifest entry lists them)."""
    csv = codebooks_filename(spec.name, OutputFormat.CSV)
    entry = json.loads((_folder(out) / MANIFEST_FILE).read_text())["files"][csv]
    exported = [record["file"] for record in entry["exports"]]
    assert csv.removesuffix(".csv") + ".index.json" in exported
    return [csv, *exported]


def _folder(out: Path) -> Path:
    return output_dir(out, REPO_ID, "LLM Dataset")


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file of the output folder: a file written again gets new ones."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _folder(out).iterdir() if p.is_file()}


def _assert_uploaded_as_is(server: HubServer, out: Path, specs: list[ModelSpec], results: list[ModelResult]) -> None:
    """One commit holds every file of ``specs`` (and the manifest), byte for byte as in ``out``, with their entries."""
    assert len(server.commits) == 1, server.commits
    commit = server.commits[0]
    expected = [f"{IN_REPO}/{name}" for spec in specs for name in _names(out, spec)]
    assert sorted(commit["paths"]) == sorted([*expected, f"{IN_REPO}/{MANIFEST_FILE}"])
    assert all(r.ok and not r.skipped and r.commit == commit["oid"] for r in results), results
    stored = server.repo_dir(REPO_ID, "dataset") / IN_REPO
    for spec in specs:
        for name in _names(out, spec):
            assert (stored / name).read_bytes() == (_folder(out) / name).read_bytes()
    local = json.loads((_folder(out) / MANIFEST_FILE).read_text())["files"]
    published = json.loads((stored / MANIFEST_FILE).read_text())["files"]
    for spec in specs:
        assert published[_names(out, spec)[0]] == local[_names(out, spec)[0]]


def test_files_up_to_date_locally_but_not_in_the_repo_are_uploaded_without_encoding(server, run, tmp_path):
    out = tmp_path / "out"
    first, _ = run(out, SPECS, upload=False)
    assert all(r.ok and not r.skipped for r in first), first
    # --out-dir alone never asks the Hub whether its files are published.
    assert not server.commits
    assert not [p for _, p, _ in server.requests if MANIFEST_FILE in p or "auth-check" in p]
    before = _stamps(out)

    results, notes = run(out, SPECS, upload=True)
    _assert_uploaded_as_is(server, out, SPECS, results)
    assert all(r.rows == 5135 and r.sha256 and r.path for r in results), results
    for spec in SPECS:
        assert any(spec.model_id in n and f"{REPO_ID} does not have it; uploading it as it is" in n for n in notes)
    assert not any("POIs written" in note for note in notes), "the up-to-date files were encoded again"
    assert _stamps(out) == before, "the up-to-date files were written again"

    # Now the repo holds them as they are: skipped, and no commit.
    again, notes = run(out, SPECS, upload=True)
    assert all(r.ok and r.skipped for r in again), again
    assert len(server.commits) == 1
    for spec in SPECS:
        assert any(spec.model_id in n and f"and in {REPO_ID}); skipped" in n for n in notes), notes


def test_a_rerun_after_a_failed_upload_uploads_the_kept_files(server, run, tmp_path):
    out = tmp_path / "out"
    server.inject("POST", "/commit/", 503, times=1)
    failed, _ = run(out, SPECS, upload=True)
    assert all(not r.ok and "HTTP 503" in r.error and "the finished files are kept in" in r.error for r in failed)
    assert not server.commits
    before = _stamps(out)

    results, notes = run(out, SPECS, upload=True)
    _assert_uploaded_as_is(server, out, SPECS, results)
    assert not any("POIs written" in note for note in notes)
    assert _stamps(out) == before


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_encoded_and_up_to_date_files_go_in_one_commit(server, run, tmp_path, local_ray, executor):
    out = tmp_path / "out"
    first, _ = run(out, SPECS[:1], upload=False)
    assert first[0].ok, first
    results, notes = run(out, SPECS, upload=True, executor=executor)
    _assert_uploaded_as_is(server, out, SPECS, results)
    assert any(SPECS[0].model_id in n and "uploading it as it is" in n for n in notes), notes
    assert not any(SPECS[1].model_id in n and "uploading it as it is" in n for n in notes), notes
    assert results[1].encode_seconds > 0 and results[0].encode_seconds == 0


def test_a_file_the_repo_holds_in_another_version_is_uploaded(server, run, tmp_path):
    out = tmp_path / "out"
    first, _ = run(out, SPECS, upload=False)
    assert all(r.ok for r in first), first
    # The repo's manifest describes the first model's file with other bytes, the second's as they are here.
    local = json.loads((_folder(out) / MANIFEST_FILE).read_text())
    theirs = json.loads(json.dumps(local))
    theirs["files"][_names(out, SPECS[0])[0]]["sha256"] = "0" * 64
    stored = server.repo_dir(REPO_ID, "dataset") / IN_REPO
    stored.mkdir(parents=True, exist_ok=True)
    (stored / MANIFEST_FILE).write_text(json.dumps(theirs))
    server.rescan("another run's manifest")

    results, notes = run(out, SPECS, upload=True)
    assert [(r.ok, r.skipped) for r in results] == [(True, False), (True, True)], results
    assert any(SPECS[0].model_id in n and f"{REPO_ID} holds another version of it" in n for n in notes), notes
    assert len(server.commits) == 1
    assert sorted(server.commits[0]["paths"]) == sorted(
        [f"{IN_REPO}/{name}" for name in _names(out, SPECS[0])] + [f"{IN_REPO}/{MANIFEST_FILE}"]
    )
    published = json.loads((stored / MANIFEST_FILE).read_text())["files"]
    assert published == local["files"]
