"""--export index-json,tensor and the prefixes file, in-process: each read back against the codebooks file, the same
whatever the blocks and the format, listed in the manifest, and never visible before they are complete."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rqvae_ray.core.contract import Export, OutputFormat, OutputSpec
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.manifest import Manifest, Provenance, check_existing
from tests.outputs.test_writer import MODELS, REPO, _blocks, _encode, _folder, _write
from tests.sid_rules import assert_exports_match

BOTH = frozenset({Export.INDEX_JSON, Export.TENSOR})
LEVELS = len(MODELS[0][1].codebook_sizes)
PROVENANCE = Provenance("c", "r", "f", "r")  # what tests.test_writer's targets record


@pytest.mark.parametrize(
    ("fmt", "dedup", "fixed", "exports"),
    [
        (OutputFormat.CSV, False, False, BOTH),
        (OutputFormat.CSV, True, False, BOTH),
        (OutputFormat.PARQUET, True, True, BOTH),
        (OutputFormat.PARQUET, False, False, frozenset({Export.TENSOR})),
        (OutputFormat.CSV, True, False, frozenset()),  # --dedup alone writes the prefixes
    ],
)
def test_exports_read_back_against_the_codebooks_file(tmp_path, fmt, dedup, fixed, exports):
    spec = OutputSpec(fmt, dedup=dedup, sid_tokens=True, fixed_length=fixed, exports=exports)
    published = _write(tmp_path, _encode(_blocks([1, 7, 64, 168]), spec, packed=True), spec).finish()
    for item in published:
        assert_exports_match(_folder(tmp_path), item.entry.file, LEVELS, dedup, {e.value for e in exports})


def test_exports_do_not_depend_on_blocks_or_format(tmp_path):
    csv = OutputSpec(OutputFormat.CSV, dedup=True, exports=BOTH)
    parquet = replace(csv, fmt=OutputFormat.PARQUET)
    a = _write(tmp_path / "a", _encode(_blocks([240]), csv, packed=True), csv).finish()
    b = _write(tmp_path / "b", _encode(_blocks([100, 140]), parquet, packed=False), parquet).finish()
    for one, other in zip(a, b, strict=True):
        assert [(r.kind, r.file, r.sha256) for r in one.entry.exports] == [
            (r.kind, r.file, r.sha256) for r in other.entry.exports
        ]
        assert [r.kind for r in one.entry.exports] == ["index-json", "tensor", "prefixes"]


def test_the_manifest_lists_the_exports_and_the_up_to_date_check_uses_them(tmp_path):
    spec = OutputSpec(dedup=True, exports=BOTH)
    published = _write(tmp_path, _encode(_blocks([240]), spec, packed=True), spec).finish()
    folder, entry = _folder(tmp_path), published[0].entry
    assert Manifest.read(folder, REPO).entries[entry.file] == entry
    for record in entry.exports:
        assert sha256_files([folder / record.file]) == record.sha256

    def stale(asked: OutputSpec) -> str:
        return check_existing(folder, entry.file, asked, PROVENANCE, REPO).stale

    assert check_existing(folder, entry.file, spec, PROVENANCE, REPO).entry == entry
    assert "other exports (now index-json, prefixes)" in stale(replace(spec, exports=frozenset({Export.INDEX_JSON})))
    assert "--fixed-length on" in stale(replace(spec, fixed_length=True))
    (folder / entry.exports[1].file).write_bytes(b"edited")
    assert f"its export {entry.exports[1].file} is missing or differs" in stale(spec)


def test_no_export_is_visible_before_it_is_published(tmp_path):
    spec = OutputSpec(dedup=True, exports=BOTH)
    writer = _write(tmp_path, _encode(_blocks([100, 140]), spec, packed=True)[:1], spec)
    assert all(path.name.startswith(".") for path in _folder(tmp_path).iterdir())
    writer.abort()
    assert list(_folder(tmp_path).iterdir()) == []


def test_export_names_and_contradictions_are_refused():
    assert Export.parse(" index-json, tensor ,") == BOTH
    assert Export.parse("") == frozenset()
    with pytest.raises(OutputError, match="'sids' is not an export; choose from index-json, tensor, prefixes"):
        Export.parse("index-json,sids")
    with pytest.raises(OutputError, match="--fixed-length .* needs --dedup"):
        OutputSpec(fixed_length=True)
    assert OutputSpec(exports=frozenset({Export.TENSOR})).exported == (Export.TENSOR, Export.PREFIXES)
    assert OutputSpec().exported == ()
