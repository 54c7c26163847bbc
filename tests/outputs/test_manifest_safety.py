"""A manifest that cannot be read is never written over (its entries would be lost): it fails its dataset's models
with one line naming it, in the output folder and in a Hub repo alike; entries are checked field by field on read;
and a file is up to date only when it holds the rows its entry records, whatever sha256 the entry was edited to."""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rqvae_ray.cli.app import app
from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.errors import ManifestError, OutputError
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, parse_model_id
from rqvae_ray.inputs.stores import HfHub, LocalHub
from rqvae_ray.outputs.keep_existing import find_published
from rqvae_ray.outputs.layout import MANIFEST_FILE, output_dir
from rqvae_ray.outputs.manifest import ExportRecord, ExtendedFile, Manifest, ManifestEntry, file_rows
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.pipeline.progress import Progress
from rqvae_ray.runner import run_models
from tests.conftest import use_hub
from tests.core.test_checkpoint_safety import ROWS, fitted, small_hub
from tests.hub_server import HubServer

REPO = "comp5331poi/nyc"
A, B = (parse_model_id(m) for m in DEFAULT_MODELS[:2])
ENTRY = {
    "file": "codebooks-m.csv",
    "model_id": "org/m",
    "format": "csv",
    "dedup": False,
    "sid_tokens": False,
    "rows": 1,
    "sha256": "0" * 64,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    return small_hub(tmp_path_factory.mktemp("hub"), {m.model_id: fitted(m.model_id) for m in (A, B)})


def _run(hub: Path, out: Path, specs=(A,), notes: list[str] | None = None, **options) -> dict:
    """One in-process run: the result of each model by ID."""
    run = RunOptions(hub=LocalHub(hub), out_dir=str(out), executor=ExecutorMode.LOCAL, **options)
    progress = Progress(notes.append) if notes is not None else None
    return {r.model_id: r for r in run_models(list(specs), run, progress)}


def _folder(out: Path) -> Path:
    return output_dir(out, REPO, "LLM Dataset")


def _document(entry: dict) -> bytes:
    return json.dumps({"tool": "rqvae_ray", "files": {entry.get("file", "x"): entry}}).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"tool": "rqvae_ray", "files": {},}', "it is not valid JSON (Expecting property name enclosed in double"),
        (b"\x80\x81", "it is not JSON text"),
        (b"[1, 2]", "it holds a JSON list, not an object"),
        (b'{"files": []}', "its 'files' is list, not an object"),
        (b'{"files": {"codebooks-m.csv": 3}}', "entry 'codebooks-m.csv': it is not an object"),
        (_document({k: v for k, v in ENTRY.items() if k != "rows"}), "entry 'codebooks-m.csv': it has no 'rows'"),
        (_document({**ENTRY, "rows": "5135"}), "its 'rows' is \"5135\", expected a whole number >= 0"),
        (_document({**ENTRY, "rows": -1}), "its 'rows' is -1, expected a whole number >= 0"),
        (_document({**ENTRY, "dedup": "no"}), "its 'dedup' is \"no\", expected true or false"),
        (_document({**ENTRY, "file": "../../x.csv"}), "its 'file' is \"../../x.csv\", expected a file name without"),
        (_document({**ENTRY, "sid_stats": []}), "its 'sid_stats' is list, expected an object"),
        (_document({**ENTRY, "encode_seconds": "1s"}), "its 'encode_seconds' is \"1s\", expected a number of"),
        (_document({**ENTRY, "exports": [{"kind": "tensor", "file": "/etc/x", "sha256": ""}]}), "its 'exports'"),
        (_document({**ENTRY, "extends": {"sha256": "x"}}), "its 'extends' is dict, expected null or a {sha256, rows}"),
    ],
    ids=[
        "trailing-comma",
        "not-text",
        "not-an-object",
        "files-not-an-object",
        "entry-not-an-object",
        "missing-field",
        "rows-a-string",
        "rows-negative",
        "bool-a-string",
        "file-with-a-folder",
        "stats-a-list",
        "seconds-a-string",
        "export-with-a-folder",
        "extends-without-rows",
    ],
)
def test_a_manifest_that_cannot_be_read_raises_naming_it(tmp_path, data, reason):
    with pytest.raises(ManifestError) as caught:
        Manifest.parse(tmp_path, REPO, data)
    message = str(caught.value)
    assert message.startswith(f"cannot read the manifest {tmp_path / MANIFEST_FILE}: ") and "\n" not in message
    assert reason in message, message
    assert "it is left as it is: repair it, or move it aside" in message


def test_good_manifests_still_read(tmp_path):
    full = ManifestEntry(
        **ENTRY,
        checkpoint_sha256="c",
        written_at="2026-01-01T00:00:00Z",
        sid_stats={"unique_sids": 1},
        encode_seconds=0.25,
        sinkhorn_levels=[3],
        fixed_length=True,
        exports=[ExportRecord("tensor", "codebooks-m.sids.pt", "e")],
        features_rows_sha256="f",
        extends=ExtendedFile("d", 1),
    )
    written = Manifest(tmp_path, REPO, {full.file: full}).to_bytes()  # every field, each of its own type
    assert Manifest.parse(tmp_path, REPO, written).entries == {full.file: full}
    assert Manifest.parse(tmp_path, REPO, None).entries == {}
    assert Manifest.parse(tmp_path, REPO, b"{}").entries == {}
    old = {"models": {"org/m": {**ENTRY, "retired_field": 1, "extends": None, "exports": []}}}
    assert Manifest.parse(tmp_path, REPO, json.dumps(old).encode()).entries["codebooks-m.csv"].rows == 1
    assert Manifest.read(tmp_path, REPO).entries == {}  # none there


def test_the_error_crosses_processes_with_what_it_carries():
    error = ManifestError("/out/m.json", "it is not valid JSON")
    again = pickle.loads(pickle.dumps(error))  # Ray ships an error raised in its writer actor to the driver
    assert type(again) is ManifestError and isinstance(again, OutputError) and str(again) == str(error)
    assert (again.path, again.reason) == ("/out/m.json", "it is not valid JSON")


def test_a_manifest_file_that_cannot_be_opened_is_not_taken_for_none(tmp_path):
    (tmp_path / MANIFEST_FILE).mkdir()
    with pytest.raises(ManifestError, match="the file cannot be read"):
        Manifest.read(tmp_path, REPO)


@pytest.mark.parametrize(
    "options", [{}, {"force": True}, {"output": OutputSpec(keep_existing=True)}], ids=["plain", "force", "keep"]
)
def test_a_corrupt_manifest_fails_the_run_of_its_dataset_and_keeps_every_entry(hub, tmp_path, options):
    first = _run(hub, tmp_path, (A, B))
    assert all(r.ok for r in first.values())
    manifest = _folder(tmp_path) / MANIFEST_FILE
    good = manifest.read_bytes()
    corrupt = good.rstrip()[:-1].rstrip() + b",\n}"  # one trailing comma
    manifest.write_bytes(corrupt)
    second = _run(hub, tmp_path, (A,), **options)
    assert not second[A.model_id].ok
    error = second[A.model_id].error
    assert error.startswith(f"cannot read the manifest {manifest}: it is not valid JSON") and "\n" not in error
    assert manifest.read_bytes() == corrupt  # not overwritten: B's entry is still there
    manifest.write_bytes(good)  # repaired: both entries are back
    assert set(Manifest.read(manifest.parent, REPO).entries) == {f"codebooks-{A.name}.csv", f"codebooks-{B.name}.csv"}


def test_a_field_of_the_wrong_type_is_one_line_from_the_command_line(hub, tmp_path, capfd):
    out = tmp_path / "out"
    assert _run(hub, out)[A.model_id].ok
    manifest = _folder(out) / MANIFEST_FILE
    document = json.loads(manifest.read_text())
    document["files"][f"codebooks-{A.name}.csv"]["rows"] = str(ROWS)
    manifest.write_text(json.dumps(document))
    args = ["--hub-dir", str(hub), "--out-dir", str(out), "--executor", "local", "--log-file", str(tmp_path / "log")]
    result = CliRunner().invoke(app, [*args, A.model_id])
    output = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 1 and "Traceback" not in output, output
    line = f"cannot read the manifest {manifest}: entry 'codebooks-{A.name}.csv': its 'rows' is \"{ROWS}\""
    assert line in output, output
    assert json.loads(manifest.read_text()) == document


def _edit_entry(manifest: Path, name: str, **values) -> None:
    document = json.loads(manifest.read_text())
    document["files"][name].update(values)
    manifest.write_text(json.dumps(document))


@pytest.mark.parametrize("fmt", [OutputFormat.CSV, OutputFormat.PARQUET])
def test_a_file_cut_short_is_redone_even_with_its_sha256_edited_to_match(hub, tmp_path, fmt):
    spec = OutputSpec(fmt)
    assert _run(hub, tmp_path, output=spec)[A.model_id].rows == ROWS
    path = _folder(tmp_path) / f"codebooks-{A.name}.{fmt.value}"
    assert file_rows(path) == ROWS
    if fmt is OutputFormat.CSV:
        path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:101]))
    else:
        pq.write_table(pq.read_table(path).slice(0, 100), path)
    assert file_rows(path) == 100
    _edit_entry(path.parent / MANIFEST_FILE, path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    refused = _run(hub, tmp_path, output=replace(spec, keep_existing=True))[A.model_id]
    assert f"cannot keep the rows of {path}: it holds 100 rows but the manifest records {ROWS}" in refused.error
    notes: list[str] = []
    again = _run(hub, tmp_path, notes=notes, output=spec)[A.model_id]
    assert again.ok and not again.skipped and again.rows == ROWS and file_rows(path) == ROWS
    assert any(f"it holds 100 rows but the manifest records {ROWS} (cut short or edited)" in n for n in notes), notes


def _published_in_hub(root: Path, repo: str, manifest: bytes) -> Path:
    """A codebooks file and the manifest bytes ``manifest`` in dataset repo ``repo`` of the hub at ``root``."""
    folder = root / "datasets" / repo / "LLM Dataset" / "Intermediate Files"
    folder.mkdir(parents=True)
    (folder / "codebooks-m.csv").write_bytes(b'Pid,Codebook,Vector\n1,"[1, 2, 3]","[0.5]"\n')
    (folder / MANIFEST_FILE).write_bytes(manifest)
    return folder / MANIFEST_FILE


def test_a_corrupt_manifest_in_a_hub_repo_is_named_there(tmp_path, monkeypatch):
    _published_in_hub(tmp_path / "hub", "org/nyc", b'{"files": {},}')
    with HubServer(tmp_path / "hub", objects_dir=tmp_path / "objects", token="hf_test") as server:
        use_hub(monkeypatch, server.url, tmp_path / "cache", "hf_test")
        with pytest.raises(ManifestError) as caught:
            find_published(None, HfHub(), "org/nyc", "LLM Dataset", "codebooks-m.csv")
    where = f"LLM Dataset/Intermediate Files/{MANIFEST_FILE} of dataset repo org/nyc"
    assert str(caught.value).startswith(f"cannot read the manifest {where}: it is not valid JSON")


def test_an_upload_keeps_a_hub_manifest_it_cannot_read(tmp_path, monkeypatch):
    root = small_hub(tmp_path / "hub", {A.model_id: fitted(A.model_id)})
    manifest = _published_in_hub(root, REPO, b'{"files": {},}')
    with HubServer(root, objects_dir=tmp_path / "objects", token="hf_test") as server:
        use_hub(monkeypatch, server.url, tmp_path / "cache", "hf_test")
        options = RunOptions(hub=LocalHub(root), out_dir=None, upload=True, executor=ExecutorMode.LOCAL)
        result = run_models([A], options)[0]
        commits = list(server.commits)
    assert not result.ok and "\n" not in result.error
    assert "cannot read the manifest" in result.error and "it is not valid JSON" in result.error, result.error
    assert manifest.read_bytes() == b'{"files": {},}' and not commits
