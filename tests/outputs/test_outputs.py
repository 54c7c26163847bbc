"""Output paths, partial files, the manifest and the up-to-date check, in-process."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from rqvae_ray.core.contract import OutputFormat, OutputSpec
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.errors import ManifestError
from rqvae_ray.outputs.layout import MANIFEST_FILE, codebooks_filename, output_dir
from rqvae_ray.outputs.manifest import Manifest, ManifestEntry, Provenance, check_existing
from rqvae_ray.outputs.staging import atomic_write, folder_lock, partial_path, remove_stale_partials

PROVENANCE = Provenance("ck", "local", "feat", "local")


def _entry(path, **changes) -> ManifestEntry:
    entry = ManifestEntry(
        file=path.name,
        model_id="org/rqvae-nyc-a",
        format="csv",
        dedup=False,
        sid_tokens=False,
        rows=3,
        sha256=sha256_files([path]),
        **vars(PROVENANCE),
    )
    return replace(entry, **changes)


def test_layout_and_names(tmp_path):
    folder = output_dir(tmp_path, "org/nyc", "LLM Dataset")
    assert folder == tmp_path / "datasets/org/nyc/LLM Dataset/Intermediate Files"
    assert codebooks_filename("rqvae-nyc-a", OutputFormat.PARQUET) == "codebooks-rqvae-nyc-a.parquet"
    partial = partial_path(folder / "codebooks-x.csv")
    assert partial.parent == folder and partial.name.startswith(".codebooks-x.csv.") and partial.suffix == ".partial"
    assert partial != partial_path(folder / "codebooks-x.csv")


def test_sha256_of_files_is_of_their_concatenation(tmp_path):
    a, b, ab = tmp_path / "a", tmp_path / "b", tmp_path / "ab"
    a.write_bytes(b"x" * 3_000_000)
    b.write_bytes(b"yz")
    ab.write_bytes(a.read_bytes() + b.read_bytes())
    assert sha256_files([a, b]) == sha256_files([ab]) != sha256_files([b, a])


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "file.json"
    atomic_write(target, lambda partial: partial.write_text("one"))
    assert target.read_text() == "one"

    def failing(partial):
        partial.write_text("half")
        raise OSError("disk full")

    try:
        atomic_write(target, failing)
    except OSError:
        pass
    assert target.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["file.json"]


TRY_LOCK = """
import fcntl, os, sys
handle = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


def test_folder_lock_is_held_against_other_processes_and_leaves_no_file(tmp_path):
    def other_process() -> str:
        return subprocess.run(
            [sys.executable, "-c", TRY_LOCK, str(tmp_path)], capture_output=True, text=True, check=True
        ).stdout.strip()

    with folder_lock(tmp_path):
        assert other_process() == "held"
    assert other_process() == "free"
    assert list(tmp_path.iterdir()) == []


def test_folder_lock_runs_the_block_unlocked_where_the_filesystem_cannot_lock(tmp_path, monkeypatch):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with folder_lock(tmp_path):
        ran.append(True)
    assert ran == [True]


def test_stale_partials_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = tmp_path / f".codebooks-a.csv.{host}-{dead.stdout.strip()}-abc.partial"
    live = tmp_path / f".codebooks-b.csv.{host}-{os.getpid()}-abc.partial"
    other_host = tmp_path / f".codebooks-c.csv.elsewhere-{dead.stdout.strip()}-abc.partial"
    published = tmp_path / "codebooks-a.csv"
    for path in (stale, live, other_host, published):
        path.write_text("x")
    assert remove_stale_partials(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, other_host, published))


def test_stale_partials_are_found_on_a_host_whose_name_has_dots_and_dashes(tmp_path, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "ip-10-0-0-1.ec2.internal")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = partial_path(tmp_path / "codebooks-a.csv", "spool")
    stale = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead.stdout.strip()}-"))
    for path in (live, stale):
        path.write_text("x")
    assert remove_stale_partials(tmp_path) == [stale] and live.exists()


def test_manifest_round_trip_keyed_by_file(tmp_path):
    csv_file, parquet_file = tmp_path / "codebooks-m.csv", tmp_path / "codebooks-m.parquet"
    csv_file.write_text("a")
    parquet_file.write_text("b")
    manifest = Manifest(tmp_path, "org/nyc")
    for path in (csv_file, parquet_file):
        manifest.entries[path.name] = _entry(path, format=path.suffix[1:])
    manifest.write()
    again = Manifest.read(tmp_path, "org/nyc")
    assert again.entries == manifest.entries  # the CSV and the Parquet file of one model live side by side
    document = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert set(document["files"]) == {"codebooks-m.csv", "codebooks-m.parquet"}


def test_manifest_of_version_0_1_is_read_and_a_broken_one_is_refused(tmp_path):
    path = tmp_path / "codebooks-m.csv"
    path.write_text("a")
    old = {"tool": "rqvae_ray", "models": {"org/m": {**vars(_entry(path)), "retired_field": 1}}}
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(old))
    assert Manifest.read(tmp_path, "org/nyc").entries["codebooks-m.csv"] == _entry(path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        Manifest.read(tmp_path, "org/nyc")


def test_check_existing_says_why_a_file_is_redone(tmp_path):
    path = tmp_path / "codebooks-m.csv"
    spec = OutputSpec()
    assert check_existing(tmp_path, path.name, spec, PROVENANCE, "org/nyc").entry is None  # nothing there
    path.write_text('Pid,Codebook,Vector\n1,"[0]","[0.5]"\n2,"[1]","[0.5]"\n3,"[2]","[0.5]"\n')
    assert "manifest does not describe" in check_existing(tmp_path, path.name, spec, PROVENANCE, "org/nyc").stale
    manifest = Manifest(tmp_path, "org/nyc", {path.name: _entry(path)})
    manifest.write()
    assert check_existing(tmp_path, path.name, spec, PROVENANCE, "org/nyc").entry == _entry(path)
    other = replace(PROVENANCE, checkpoint_sha256="new")
    assert "checkpoint_sha256" in check_existing(tmp_path, path.name, spec, other, "org/nyc").stale
    assert "--dedup on" in check_existing(tmp_path, path.name, OutputSpec(dedup=True), PROVENANCE, "org/nyc").stale
    tokens = _entry(path, dedup=True, sid_tokens=True)
    assert tokens.changed_options(OutputSpec(dedup=True)) == [("--sid-tokens on", "--sid-tokens off")]
    assert tokens.changed_options(OutputSpec(fixed_length=True, dedup=True, sid_tokens=True)) == [
        ("--fixed-length off", "--fixed-length on")
    ]
    assert tokens.changed_options(OutputSpec(dedup=True, sid_tokens=True, max_per_sid=2)) == [
        ("no --max-per-sid", "--max-per-sid 2")
    ]
    path.write_text("Pid,Codebook,Vector\n1")
    assert "sha256" in check_existing(tmp_path, path.name, spec, PROVENANCE, "org/nyc").stale
