"""Decoded inputs kept between runs: an entry gives exactly what decoding gives (every array's bits and dtype, the
layout, the Sinkhorn levels, the digests), a hit imports no torch, and a damaged, foreign or missing entry, an
unwritable folder or a full budget only costs a decode."""

from __future__ import annotations

import argparse
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rqvae_ray.core.checkpoint import CheckpointError, ModelWeights, load_checkpoint_bytes
from rqvae_ray.core.encoder import Encoder
from rqvae_ray.inputs import decoded_cache
from rqvae_ray.inputs import features as features_module
from rqvae_ray.inputs.decoded_cache import DecodedCache, Kind
from rqvae_ray.inputs.demo import fit_checkpoint, nyc_features, write_dataset
from rqvae_ray.inputs.features import load_features
from rqvae_ray.inputs.model_ids import parse_model_id
from rqvae_ray.inputs.stores import LocalHub
from tests.conftest import run_cli

ROWS = 300
DATASET = "org/nyc"


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return nyc_features()[0][:ROWS]


@pytest.fixture(scope="module")
def state(features) -> dict:
    return fit_checkpoint(parse_model_id("comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5"), features)


def _saved(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint_bytes(state) -> bytes:
    """A published-layout checkpoint whose training arguments ask for Sinkhorn at level 3."""
    return _saved({**state, "args": argparse.Namespace(use_sk=True, sk_epsilons=[0.0, 0.0, 0.003])})


def _assert_same_model(mine: ModelWeights, theirs: ModelWeights) -> None:
    assert (mine.layout, mine.sha256, mine.sinkhorn) == (theirs.layout, theirs.sha256, theirs.sinkhorn)
    assert len(mine.layers) == len(theirs.layers) and len(mine.codebooks) == len(theirs.codebooks)
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        assert a.relu == b.relu
        for x, y in ((a.weight, b.weight), (a.bias, b.bias)):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    for x, y in zip(mine.codebooks, theirs.codebooks, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _no_decoding(*_args, **_kwargs):
    pytest.fail("decoded again: the cache was not read")


def test_a_cached_checkpoint_is_the_decoded_one(tmp_path, checkpoint_bytes, features, monkeypatch):
    decoded = load_checkpoint_bytes(checkpoint_bytes)
    cache = DecodedCache(tmp_path / "cache")
    first = cache.weights(checkpoint_bytes)
    entry = cache.path(Kind.CHECKPOINT, decoded.sha256)
    assert entry.is_file() and decoded.sinkhorn == ((3, 0.003),)
    monkeypatch.setattr(decoded_cache, "load_checkpoint_bytes", _no_decoding)
    second = cache.weights(checkpoint_bytes)
    _assert_same_model(first, decoded)
    _assert_same_model(second, decoded)
    rows = load_features(_files(_hub(tmp_path / "rows-hub", features))).rows
    for got, want in zip(Encoder(second).encode(rows), Encoder(decoded).encode(rows), strict=True):
        np.testing.assert_array_equal(got, want)


def _hub(hub: Path, features: np.ndarray) -> Path:
    meta = {"total_dim": features.shape[1], "num_pois": len(features)}
    write_dataset(hub, DATASET, features, meta, [(f"poi-{pid}", pid) for pid in range(1, len(features) + 1)])
    return hub


def _files(hub: Path):
    return LocalHub(hub).dataset_files(*DATASET.split("/"))


@pytest.mark.parametrize("valued", [False, True], ids=["multi-hot", "valued"])
def test_cached_features_are_the_decoded_ones(tmp_path, features, valued, monkeypatch):
    values = features * np.linspace(0.5, 2.0, features.shape[1], dtype=np.float32) if valued else features
    hub = _hub(tmp_path / "hub", values)
    decoded = load_features(_files(hub))
    cache = DecodedCache(tmp_path / "cache")
    first = load_features(_files(hub), cache)
    assert cache.path(Kind.FEATURES, decoded.sha256).is_file()
    monkeypatch.setattr(features_module, "load_dense_features", _no_decoding)
    second = load_features(_files(hub), cache)
    for got in (first, second):
        assert (got.dim, got.num_pois, got.sha256, got.revision) == (
            decoded.dim,
            decoded.num_pois,
            decoded.sha256,
            decoded.revision,
        )
        for x, y in ((got.rows.indptr, decoded.rows.indptr), (got.rows.indices, decoded.rows.indices)):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
        if valued:
            assert got.rows.values.dtype == decoded.rows.values.dtype
            assert got.rows.values.tobytes() == decoded.rows.values.tobytes()
        else:
            assert got.rows.values is None and decoded.rows.values is None


def test_a_hit_imports_no_torch(tmp_path, checkpoint_bytes, features):
    hub = _hub(tmp_path / "hub", features)
    (tmp_path / "model.pt").write_bytes(checkpoint_bytes)
    cache = DecodedCache(tmp_path / "cache")
    cache.weights(checkpoint_bytes)
    load_features(_files(hub), cache)
    script = f"""
import json, sys
from pathlib import Path
from rqvae_ray.inputs.decoded_cache import DecodedCache
from rqvae_ray.inputs.features import load_features
from rqvae_ray.inputs.stores import LocalHub
cache = DecodedCache(Path({str(tmp_path / "cache")!r}))
weights = cache.weights(Path({str(tmp_path / "model.pt")!r}).read_bytes())
features = load_features(LocalHub(Path({str(hub)!r})).dataset_files("org", "nyc"), cache)
print(json.dumps([weights.describe(), features.num_pois, "torch" in sys.modules]))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    described, pois, torch_imported = json.loads(proc.stdout)
    assert (described, pois) == (load_checkpoint_bytes(checkpoint_bytes).describe(), ROWS)
    assert not torch_imported


def _flip_byte_in_array_data(path: Path) -> None:
    """Change the last byte of the first array's data, leaving the zip structure whole."""
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[0]
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)  # its local file header
    data[info.header_offset + 30 + name_length + extra_length + info.file_size - 1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _foreign_arrays(path: Path) -> None:
    """A well-formed npz whose arrays do not form a model (a codebook of the wrong width)."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["codebook0"] = arrays["codebook0"][:, :3]
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


@pytest.mark.parametrize("damage", [_flip_byte_in_array_data, _truncate, _foreign_arrays, Path.unlink])
def test_a_damaged_entry_is_decoded_again(tmp_path, checkpoint_bytes, damage):
    decoded = load_checkpoint_bytes(checkpoint_bytes)
    cache = DecodedCache(tmp_path / "cache")
    cache.weights(checkpoint_bytes)
    entry = cache.path(Kind.CHECKPOINT, decoded.sha256)
    damage(entry)
    _assert_same_model(cache.weights(checkpoint_bytes), decoded)
    _assert_same_model(cache.weights(checkpoint_bytes), decoded)  # the entry written again is whole
    assert entry.is_file()


def test_damaged_features_entry_is_decoded_again(tmp_path, features):
    hub = _hub(tmp_path / "hub", features)
    cache = DecodedCache(tmp_path / "cache")
    decoded = load_features(_files(hub), cache)
    entry = cache.path(Kind.FEATURES, decoded.sha256)
    with np.load(entry) as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["indices"] = arrays["indices"] + decoded.dim  # columns outside the features
    with entry.open("wb") as handle:
        np.savez(handle, **arrays)
    again = load_features(_files(hub), cache)
    assert again.rows.indices.tobytes() == decoded.rows.indices.tobytes()


def test_an_entry_of_other_decoding_code_is_not_used(tmp_path, checkpoint_bytes, monkeypatch):
    cache = DecodedCache(tmp_path / "cache")
    cache.weights(checkpoint_bytes)
    sha256 = load_checkpoint_bytes(checkpoint_bytes).sha256
    before = cache.path(Kind.CHECKPOINT, sha256)
    monkeypatch.setattr(decoded_cache, "decoders_digest", lambda: "f" * 64)
    after = cache.path(Kind.CHECKPOINT, sha256)
    assert after != before and not after.exists()
    cache.weights(checkpoint_bytes)
    assert after.is_file() and before.is_file()


def test_the_code_digest_covers_the_decoders():
    package = Path(decoded_cache.__file__).parent.parent
    for name in decoded_cache.DECODERS:
        assert (package / name).is_file(), name
    assert len(decoded_cache.decoders_digest()) == 64


def test_the_least_recently_used_entries_leave_first(tmp_path, state, checkpoint_bytes):
    folder = tmp_path / "cache"
    blobs = [_saved({**state, "epoch": n}) for n in range(3)]
    entry_size = None
    for number, blob in enumerate(blobs):
        DecodedCache(folder).weights(blob)
        entry = DecodedCache(folder).path(Kind.CHECKPOINT, load_checkpoint_bytes(blob).sha256)
        entry_size = entry.stat().st_size
        os.utime(entry, (1_000_000 + number, 1_000_000 + number))
    DecodedCache(folder).weights(blobs[0])  # used again: now the most recent
    tight = DecodedCache(folder, budget_bytes=2 * entry_size + entry_size // 2)
    tight.weights(checkpoint_bytes)  # a fourth entry: the two least recently used must go
    kept = {path.name for path in folder.glob("*.npz")}
    names = {n: tight.path(Kind.CHECKPOINT, load_checkpoint_bytes(b).sha256).name for n, b in enumerate(blobs)}
    assert names[0] in kept and names[1] not in kept and names[2] not in kept
    assert len(kept) == 2


def test_stale_temporary_files_are_removed(tmp_path, checkpoint_bytes):
    folder = tmp_path / "cache"
    folder.mkdir()
    stale, fresh = folder / ".dead.tmp", folder / ".writing.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"half an entry")
    old = time.time() - decoded_cache.STALE_TEMPORARY_S - 60
    os.utime(stale, (old, old))
    DecodedCache(folder).weights(checkpoint_bytes)
    assert not stale.exists() and fresh.exists()


def test_an_unwritable_cache_only_costs_the_decode(tmp_path, checkpoint_bytes):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    cache = DecodedCache(blocked / "cache")
    _assert_same_model(cache.weights(checkpoint_bytes), load_checkpoint_bytes(checkpoint_bytes))


def test_a_refused_checkpoint_is_refused_every_time_and_never_kept(tmp_path, checkpoint_bytes):
    cache = DecodedCache(tmp_path / "cache")
    cut = checkpoint_bytes[: len(checkpoint_bytes) // 2]
    for _ in range(2):
        with pytest.raises(CheckpointError):
            cache.weights(cut)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_the_command_keeps_entries_and_gives_the_same_bytes(tmp_path, demo_hub):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    model = "comp5331poi/rqvae-nyc-div0.0-commit0.5-lr5e-5"
    folder = tmp_path / "xdg" / "rqvae_ray" / "inputs"
    outputs = []
    for number, extra in enumerate(([], [], ["--no-input-cache"])):
        out = tmp_path / f"out{number}"
        if extra:
            for entry in folder.iterdir():
                entry.unlink()
        proc = run_cli("--hub-dir", str(demo_hub), "--out-dir", str(out), "--quiet", *extra, model, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        kinds = sorted(path.name.split("-")[0] for path in folder.glob("*.npz"))
        assert kinds == ([] if extra else ["checkpoint", "features"])
        outputs.append(sorted(out.rglob("codebooks-*.csv"))[0].read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]


def test_an_entry_larger_than_the_budget_is_not_written(tmp_path, checkpoint_bytes):
    cache = DecodedCache(tmp_path / "cache", budget_bytes=1 << 20)  # the model holds ~3 MB
    _assert_same_model(cache.weights(checkpoint_bytes), load_checkpoint_bytes(checkpoint_bytes))
    assert not (tmp_path / "cache").exists()


def test_a_read_only_entry_is_still_used(tmp_path, checkpoint_bytes, monkeypatch):
    cache = DecodedCache(tmp_path / "cache")
    cache.weights(checkpoint_bytes)

    def refused(*_args, **_kwargs):
        raise PermissionError("another user's file")

    monkeypatch.setattr(decoded_cache.os, "utime", refused)
    monkeypatch.setattr(decoded_cache, "load_checkpoint_bytes", _no_decoding)
    _assert_same_model(cache.weights(checkpoint_bytes), load_checkpoint_bytes(checkpoint_bytes))


def test_without_the_decoders_source_nothing_is_kept_or_read(tmp_path, checkpoint_bytes, monkeypatch):
    cache = DecodedCache(tmp_path / "cache")
    cache.weights(checkpoint_bytes)
    monkeypatch.setattr(decoded_cache, "DECODERS", (*decoded_cache.DECODERS, "core/not-installed.py"))
    decoded_cache.decoders_digest.cache_clear()
    try:
        calls = []
        real = decoded_cache.load_checkpoint_bytes
        monkeypatch.setattr(decoded_cache, "load_checkpoint_bytes", lambda *a, **k: calls.append(1) or real(*a, **k))
        _assert_same_model(cache.weights(checkpoint_bytes), load_checkpoint_bytes(checkpoint_bytes))
        assert calls == [1]  # decoded, the entry of before not read
        assert len(list((tmp_path / "cache").iterdir())) == 1  # and nothing new kept
    finally:
        decoded_cache.decoders_digest.cache_clear()


def test_the_python_api_keeps_entries_where_its_options_say(tmp_path, demo_hub):
    from rqvae_ray.api.batch_inference import BatchInferenceProcessor

    spec = parse_model_id("comp5331poi/rqvae-nyc-div0.0-commit0.5-lr5e-5")
    options = {"hub_dir": demo_hub, "out_dir": tmp_path / "out", "executor": "local"}
    assert BatchInferenceProcessor(**options).run([spec])[0].ok
    assert BatchInferenceProcessor(**options, input_cache=tmp_path / "cache", force=True).run([spec])[0].ok
    assert sorted(path.name.split("-")[0] for path in (tmp_path / "cache").glob("*.npz")) == ["checkpoint", "features"]


def test_runs_writing_the_same_entry_at_once_leave_one_whole_entry(tmp_path, checkpoint_bytes):
    from concurrent.futures import ThreadPoolExecutor

    cache = DecodedCache(tmp_path / "cache")
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: cache.weights(checkpoint_bytes), range(8)))
    decoded = load_checkpoint_bytes(checkpoint_bytes)
    for model in models:
        _assert_same_model(model, decoded)
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [cache.path(Kind.CHECKPOINT, decoded.sha256).name]
    _assert_same_model(cache.weights(checkpoint_bytes), decoded)
