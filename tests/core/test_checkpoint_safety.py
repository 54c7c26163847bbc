"""Checkpoints that must fail alone and cleanly, or load: half-precision weights (exact in float64), tensors that
claim more bytes than the file holds (refused by name before anything is allocated), compressed records, weights
of a dtype that is not real, any other failure while converting; and in a run, a bad checkpoint fails its model only.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rqvae_ray
from rqvae_ray.cli.app import app
from rqvae_ray.core import checkpoint
from rqvae_ray.core.checkpoint import load_checkpoint_bytes, load_checkpoint_file, weights_from_checkpoint
from rqvae_ray.errors import CheckpointError
from rqvae_ray.inputs.demo import LEVELS, fit_checkpoint, nyc_features, write_dataset
from rqvae_ray.inputs.model_ids import DEFAULT_MODELS, ModelSpec, parse_model_id
from rqvae_ray.inputs.stores import CHECKPOINT_FILE, LocalHub
from rqvae_ray.pipeline.options import ExecutorMode, RunOptions
from rqvae_ray.runner import run_models

ROWS = 300
CODEBOOK = "model_state_dict.quantizer.quantizers.0.vectors.weight"


def small_hub(root: Path, checkpoints: dict[str, dict], rows: int = ROWS) -> Path:
    """A hub of the first ``rows`` NYC POIs (dataset ``comp5331poi/nyc``) and a checkpoint file per model ID."""
    features, metadata, mapping = nyc_features()
    write_dataset(root, "comp5331poi/nyc", features[:rows], {**metadata, "num_pois": rows}, mapping[:rows])
    for model_id, state in checkpoints.items():
        spec = parse_model_id(model_id)
        path = root / "models" / spec.org / spec.name / CHECKPOINT_FILE
        path.parent.mkdir(parents=True)
        torch.save(state, path)
    return root


def fitted(model_id: str, rows: int = ROWS) -> dict:
    """A published-layout checkpoint of ``model_id`` fitted to the first ``rows`` NYC POIs."""
    return fit_checkpoint(parse_model_id(model_id), nyc_features()[0][:rows])


def with_codebooks(checkpoint: dict, change: Callable[[list[torch.Tensor]], list[torch.Tensor]]) -> dict:
    """``checkpoint`` whose codebooks (one per level) are those ``change`` makes of its own (EMA buffers dropped)."""
    state = checkpoint["model_state_dict"]
    books = [state[f"quantizer.quantizers.{level}.vectors.weight"] for level in range(LEVELS)]
    kept = {key: value for key, value in state.items() if not key.startswith("quantizer.")}
    changed = {f"quantizer.quantizers.{level}.vectors.weight": book for level, book in enumerate(change(books))}
    return {**checkpoint, "model_state_dict": {**kept, **changed}}


def run_in_process(hub: Path, out: Path, capfd: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """The command line in this process (``--executor local``) from ``hub`` to ``out``: its exit status and all it
    printed."""
    log = out.with_name(f"{out.name}.log")
    options = ["--hub-dir", str(hub), "--out-dir", str(out), "--executor", "local", "--log-file", str(log)]
    result = CliRunner().invoke(app, [*options, *args])
    return result.exit_code, result.output + "".join(capfd.readouterr())


def _bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _with_state(published: dict, **tensors: torch.Tensor) -> dict:
    """``published`` with tensors of its state dict replaced (keys given with '__' for '.')."""
    state = dict(published["model_state_dict"])
    state.update({key.replace("__", "."): value for key, value in tensors.items()})
    return {**published, "model_state_dict": state}


def _as(published: dict, dtype: torch.dtype) -> dict:
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in published["model_state_dict"].items()}
    return {**published, "model_state_dict": state}


@pytest.fixture(scope="module")
def published() -> dict:
    return fitted(DEFAULT_MODELS[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_exactly(published, dtype):
    half = _as(published, dtype)
    weights = load_checkpoint_bytes(_bytes(half))
    # The same values held in float64 give the very same model: the conversion loses nothing.
    exact = weights_from_checkpoint(_as(half, torch.float64))
    assert weights.describe() == exact.describe()
    for got, want in zip(weights.layers, exact.layers, strict=True):
        np.testing.assert_array_equal(got.weight, want.weight)
        np.testing.assert_array_equal(got.bias, want.bias)
    for got, want in zip(weights.codebooks, exact.codebooks, strict=True):
        np.testing.assert_array_equal(got, want)
    features = nyc_features()[0][:50]
    codes, vectors = rqvae_ray.load_model(_bytes(half)).encode(features)
    want_codes, want_vectors = rqvae_ray.api.model.Model(exact).encode(features)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(vectors, want_vectors)


def test_a_tensor_repeating_its_storage_beyond_the_file_is_refused_by_name(published, tmp_path):
    # The file of the report: 3.4 MB declaring a 2^31 x 64 codebook (one stored row repeated by a zero stride).
    huge = torch.zeros(64).expand(2**31, 64)
    data = _bytes(_with_state(published, quantizer__quantizers__0__vectors__weight=huge))
    assert len(data) < 8 << 20
    (tmp_path / "x.pt").write_bytes(data)
    for load in (lambda: load_checkpoint_bytes(data), lambda: rqvae_ray.load_model(tmp_path / "x.pt")):
        with pytest.raises(CheckpointError) as caught:
            load()
        message = str(caught.value)
        assert f"tensor '{CODEBOOK}' of shape [2147483648, 64]" in message, message
        assert f"more than the whole file's {len(data)}" in message and "\n" not in message


def _declaring(data: bytes, old: bytes, new: bytes) -> bytes:
    """The torch archive ``data`` with ``old`` replaced by ``new`` in its pickle."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w") as target:
        for entry in source.infolist():
            content = source.read(entry)
            if entry.filename.endswith("/data.pkl"):
                assert content.count(old) == 1
                content = content.replace(old, new)
            target.writestr(entry.filename, content)
    return out.getvalue()


def test_a_storage_declared_larger_than_the_file_is_refused_by_name():
    data = _bytes({"w": torch.arange(16, dtype=torch.float32)})
    # The storage's persistent id ends with its element count (BININT1 16, then TUPLE); declare 2^28 instead.
    bad = _declaring(data, b"K\x10t", b"J" + (2**28).to_bytes(4, "little") + b"t")
    with pytest.raises(CheckpointError, match=r"tensor 'w' of shape \[16\] \(torch.float32\) claims 1073741824 bytes"):
        load_checkpoint_bytes(bad)


def test_a_compressed_record_that_unpacks_beyond_the_file_is_refused_unread():
    data = _bytes({"w": torch.zeros(4 << 20)})  # 16 MiB of zeros: a few KiB once deflated
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for entry in source.infolist():
            target.writestr(entry.filename, source.read(entry))
    packed = out.getvalue()
    assert len(packed) < 1 << 20
    with pytest.raises(CheckpointError, match=r"record '[^']*/data/0' unpacks to more bytes than the whole file's"):
        load_checkpoint_bytes(packed)


def test_weights_that_are_not_real_numbers_are_refused(published):
    book = published["model_state_dict"]["quantizer.quantizers.0.vectors.weight"].to(torch.complex64)
    with pytest.raises(CheckpointError, match="'quantizer.quantizers.0.vectors.weight' has dtype torch.complex64"):
        load_checkpoint_bytes(_bytes(_with_state(published, quantizer__quantizers__0__vectors__weight=book)))


def test_any_other_failure_while_converting_is_a_checkpoint_error(published, monkeypatch, tmp_path):
    def fail(*_args, **_kwargs):
        raise MemoryError("Unable to allocate 512. GiB for an array with shape (2147483648, 64)")

    monkeypatch.setattr(checkpoint, "_codebooks", fail)
    (tmp_path / "x.pt").write_bytes(_bytes(published))
    with pytest.raises(CheckpointError, match=r"x.pt: cannot be used \(MemoryError: Unable to allocate 512. GiB"):
        load_checkpoint_file(tmp_path / "x.pt")


def test_a_bad_checkpoint_fails_its_model_alone(published, tmp_path, monkeypatch):
    good, half, huge, unreadable = DEFAULT_MODELS[0], DEFAULT_MODELS[1], DEFAULT_MODELS[2], DEFAULT_MODELS[3]
    repeated = torch.zeros(64).expand(2**31, 64)
    hub = small_hub(
        tmp_path / "hub",
        {
            good: published,
            half: _as(fitted(half), torch.bfloat16),
            huge: _with_state(fitted(huge), quantizer__quantizers__0__vectors__weight=repeated),
            unreadable: fitted(unreadable),
        },
    )
    read = LocalHub.checkpoint

    def checkpoint_of(self: LocalHub, spec: ModelSpec) -> tuple[bytes, str]:
        if spec.model_id == unreadable:  # a fault no loader check foresees
            raise PermissionError(13, "Permission denied", CHECKPOINT_FILE)
        return read(self, spec)

    monkeypatch.setattr(LocalHub, "checkpoint", checkpoint_of)
    specs = [parse_model_id(m) for m in (good, half, huge, unreadable)]
    options = RunOptions(hub=LocalHub(hub), out_dir=str(tmp_path / "out"), executor=ExecutorMode.LOCAL)
    results = {r.model_id: r for r in run_models(specs, options)}
    assert results[good].ok and results[good].rows == ROWS
    assert results[half].ok and results[half].rows == ROWS
    assert not results[huge].ok and f"tensor '{CODEBOOK}'" in results[huge].error
    assert not results[unreadable].ok
    assert results[unreadable].error == (
        f"{unreadable}: its checkpoint could not be loaded (PermissionError: [Errno 13] Permission denied: "
        f"'{CHECKPOINT_FILE}')"
    )
