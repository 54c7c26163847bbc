"""The dataset writer when its folder fails it: exports an earlier run wrote and this one does not are removed, a full
disk, a folder removed or made unwritable during the run each give one line naming the folder and the cause, and an
abort leaves no partial file behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.layout import MANIFEST_FILE
from rqvae_ray.outputs.manifest import Manifest
from rqvae_ray.outputs.resume import ResumeState
from rqvae_ray.outputs.sinks.journal import Journal
from rqvae_ray.outputs.staging import PARTIAL_SUFFIX, HashingFile
from rqvae_ray.outputs.targets import Published, Refused
from tests.outputs.test_writer import MODELS, REPO, _blocks, _encode, _folder, _resumable_targets, _targets, _write
from tests.writing import dataset_writer

EXPORTS = frozenset({Export.INDEX_JSON, Export.TENSOR})
NO_SPACE = "no space left on the device; free space or choose another --out-dir"


def _names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def _published(tmp_path: Path, spec: OutputSpec) -> list[Published]:
    results = _write(tmp_path, _encode(_blocks([100, 140]), spec, packed=True), spec).finish()
    assert all(isinstance(result, Published) for result in results)
    return results


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_run_without_exports_removes_those_an_earlier_run_wrote(tmp_path):
    first = _published(tmp_path, OutputSpec(dedup=True, exports=EXPORTS))
    assert {len(item.entry.exports) for item in first} == {3}  # index.json, sids.pt, prefixes.json
    plain = _published(tmp_path, OutputSpec())
    names = [item.entry.file for item in plain]
    assert _names(_folder(tmp_path)) == sorted([MANIFEST_FILE, *names])
    assert all(entry.exports == [] for entry in Manifest.read(_folder(tmp_path), REPO).entries.values())


def test_an_export_file_the_manifest_does_not_list_is_removed_too(tmp_path):
    _published(tmp_path, OutputSpec(exports=frozenset({Export.INDEX_JSON})))
    (_folder(tmp_path) / MANIFEST_FILE).unlink()  # a run of an older version, or a lost manifest
    plain = _published(tmp_path, OutputSpec(exports=frozenset({Export.TENSOR})))
    exported = [record.file for item in plain for record in item.entry.exports]
    assert sorted(name.split(".", 1)[1] for name in exported) == sorted(["prefixes.json", "sids.pt"] * len(MODELS))
    assert _names(_folder(tmp_path)) == sorted([MANIFEST_FILE, *(item.entry.file for item in plain), *exported])


def test_the_exports_of_the_model_file_in_the_other_format_stay(tmp_path):
    parquet = _published(tmp_path, OutputSpec(OutputFormat.PARQUET, exports=EXPORTS))
    csv = _published(tmp_path, OutputSpec())
    folder = _folder(tmp_path)
    records = [record for item in parquet for record in item.entry.exports]
    assert len(records) == 3 * len(MODELS)  # index.json, sids.pt, prefixes.json
    for record in records:
        assert sha256_files([folder / record.file]) == record.sha256
    entries = Manifest.read(folder, REPO).entries
    assert set(entries) == {item.entry.file for item in [*parquet, *csv]}


@pytest.mark.parametrize(("spec", "failing_in"), [(OutputSpec(), "write"), (OutputSpec(dedup=True), "finish")])
def test_a_full_disk_names_the_folder_and_leaves_no_partial_file(tmp_path, monkeypatch, spec, failing_in):
    blocks = _encode(_blocks([100, 140]), spec, packed=True)
    writer = dataset_writer(REPO, _targets(spec.fmt), str(tmp_path), spec, sum(b.num_rows for b in blocks))
    monkeypatch.setattr(HashingFile, "write", _no_space)
    with pytest.raises(OutputError) as failed:
        for block in blocks:
            writer.write(block)
        writer.finish()
    assert str(failed.value) == f"cannot write in {_folder(tmp_path)}: {NO_SPACE}"
    assert (failing_in == "write") == (writer.next_pid == 1)
    writer.abort()
    assert _names(_folder(tmp_path)) == []


def test_an_interruption_on_a_full_disk_drops_the_partial_files_first(tmp_path, monkeypatch):
    spec = OutputSpec(dedup=True, exports=EXPORTS)
    writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(tmp_path), spec, 240)
    writer.write(_encode(_blocks([100, 140]), spec, packed=True)[0])
    writer.checkpoint()
    monkeypatch.setattr(Journal, "checkpoint", _no_space)
    with pytest.raises(OutputError) as failed:
        writer.checkpoint()
    assert str(failed.value) == f"cannot write in {_folder(tmp_path)}: {NO_SPACE}"
    writer.abort(keep_resume=True)  # the resume state cannot be written: the one kept at the last checkpoint stays
    names = _names(_folder(tmp_path))
    assert not [name for name in names if name.endswith(PARTIAL_SUFFIX)]
    assert names == sorted(
        f".{t.filename}{end}" for t in _targets(OutputFormat.CSV) for end in (".resume", ".resume.json")
    )
    assert [ResumeState.read(_folder(tmp_path) / t.filename).rows for t in _targets(OutputFormat.CSV)] == [100, 100]


def test_a_folder_removed_during_the_run_is_named_with_the_cause(tmp_path):
    spec = OutputSpec(exports=EXPORTS)
    blocks = _encode(_blocks([100, 140]), spec, packed=True)
    for keep_resume in (True, False):
        out = tmp_path / str(keep_resume)
        removed = (
            f"cannot write in {_folder(out)}: the folder was removed during the run; rerun to write its files again"
        )
        writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(out), spec, 240)
        writer.write(blocks[0])
        shutil.rmtree(_folder(out))
        with pytest.raises(OutputError) as failed:
            writer.checkpoint()
        assert str(failed.value) == removed
        writer.write(blocks[1])  # the open files take more rows; only their publication fails
        with pytest.raises(OutputError) as failed:
            writer.finish()
        assert str(failed.value) == removed
        writer.abort(keep_resume)
        assert not _folder(out).exists()


def test_a_folder_made_unwritable_fails_every_model_with_the_folder_named(tmp_path, monkeypatch):
    spec = OutputSpec(exports=EXPORTS)
    writer = _write(tmp_path, _encode(_blocks([100, 140]), spec, packed=True), spec)

    def denied(source, target):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(source))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(OutputError) as failed:
        writer.finish()
    assert str(failed.value) == (
        f"cannot write in {_folder(tmp_path)}: permission denied; make the folder writable or choose another --out-dir"
    )
    writer.abort()
    assert _names(_folder(tmp_path)) == []


def test_a_file_that_cannot_be_put_in_place_refuses_only_its_model(tmp_path):
    spec = OutputSpec()
    writer = _write(tmp_path, _encode(_blocks([100, 140]), spec, packed=True), spec)
    blocked = _targets(spec.fmt)[0].filename
    (_folder(tmp_path) / blocked).mkdir()  # a folder where the first model's file goes
    refused, published = writer.finish()
    assert refused == Refused(
        MODELS[0][0],
        f"cannot write {blocked} in {_folder(tmp_path)}: {os.strerror(errno.EISDIR)}; check the folder or choose "
        "another --out-dir",
    )
    assert isinstance(published, Published)
    assert _names(_folder(tmp_path)) == sorted([MANIFEST_FILE, blocked, published.entry.file])
    assert set(Manifest.read(_folder(tmp_path), REPO).entries) == {published.entry.file}


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs; skipped where this process may not mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_real_full_disk_is_freed_when_the_run_fails(small_disk):
    spec = OutputSpec(sid_tokens=True)
    blocks = _encode(_blocks([20] * 12), spec, packed=True)
    writer = dataset_writer(REPO, _resumable_targets(OutputFormat.CSV), str(small_disk), spec, 240)
    with pytest.raises(OutputError) as failed:
        for block in blocks:
            writer.write(block)
            writer.checkpoint()
        writer.finish()
    assert str(failed.value) == f"cannot write in {_folder(small_disk)}: {NO_SPACE}"
    writer.abort()
    assert _names(_folder(small_disk)) == []
    assert shutil.disk_usage(small_disk).used < 16 * 1024
