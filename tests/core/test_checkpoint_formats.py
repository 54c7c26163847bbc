"""Checkpoint formats: the GNPR-SID authors' layout against the published one and an independent torch reference,
and what loading refuses (unknown layouts, truncated files, pickled code, globals outside the allowlist, bad keys)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rqvae_ray.core import checkpoint
from rqvae_ray.core.checkpoint import CheckpointError, load_checkpoint_bytes, load_checkpoint_file
from rqvae_ray.core.encoder import Encoder, SparseRows
from rqvae_ray.inputs.demo import fit_checkpoint, nyc_features
from rqvae_ray.inputs.model_ids import parse_model_id

ROWS = 400


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    return nyc_features()[0][:ROWS]


@pytest.fixture(scope="module")
def published(features) -> dict:
    return fit_checkpoint(parse_model_id("comp5331poi/rqvae-nyc-div0.25-commit0.5-lr5e-5"), features)


def _args(**extra) -> argparse.Namespace:
    """Training arguments like the authors' ``parse_args()`` output."""
    values = {"lr": 1e-3, "epochs": 3000, "bn": True, "layers": [256, 128, 128], "e_dim": 64, "use_sk": False}
    return argparse.Namespace(**{**values, "sk_epsilons": [0.0, 0.0, 0.003], "device": "cuda:7", **extra})


def _authors_file(state: dict[str, torch.Tensor], path: Path, optimizer: dict | None = None, protocol: int = 4) -> Path:
    """Save ``state`` the way the authors' trainer does (``Trainer._save_checkpoint``, pickle protocol 4)."""
    payload = {"args": _args(), "epoch": 1000, "best_loss": 0.125, "best_collision_rate": 0.25, "state_dict": state}
    torch.save({**payload, "optimizer": optimizer or {"state": {}, "param_groups": []}}, path, pickle_protocol=protocol)
    return path


def _to_authors_layout(state: dict[str, torch.Tensor], latent: int) -> dict[str, torch.Tensor]:
    """The same weights as a published-layout state dict, keyed as GNPR-SID's ``RQVAE.state_dict()``.

    Published block ``k``: Linear ``4k``, BatchNorm ``4k+1`` (ReLU, Dropout); the authors' MLPLayers: Dropout ``4k``,
    Linear ``4k+1``, BatchNorm ``4k+2``, ReLU ``4k+3``, and the projection becomes the last Linear (no activation).
    """
    out: dict[str, torch.Tensor] = {}
    block = 0
    while f"encoder.layers.{4 * block}.weight" in state:
        for name, value in state.items():
            for source, target in ((4 * block, 4 * block + 1), (4 * block + 1, 4 * block + 2)):
                if name.startswith(f"encoder.layers.{source}."):
                    out[f"encoder.mlp_layers.{target}.{name.rsplit('.', 1)[1]}"] = value.clone()
        block += 1
    for name in ("weight", "bias"):
        out[f"encoder.mlp_layers.{4 * block + 1}.{name}"] = state[f"encoder.proj.{name}"].clone()
    level = 0
    while f"quantizer.quantizers.{level}.vectors.weight" in state:
        out[f"rq.vq_layers.{level}.embedding.weight"] = state[f"quantizer.quantizers.{level}.vectors.weight"].clone()
        level += 1
    decoder = nn.Sequential(nn.Dropout(), nn.Linear(latent, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 1407))
    out.update({f"decoder.mlp_layers.{k}": v for k, v in decoder.state_dict().items()})
    return out


def test_authors_layout_gives_the_published_sids(tmp_path, published, features):
    state = published["model_state_dict"]
    latent = state["encoder.proj.weight"].shape[0]
    authors_state = _to_authors_layout(state, latent)
    assert {"encoder.mlp_layers.1.weight", "encoder.mlp_layers.2.running_var", "encoder.mlp_layers.13.weight"} <= set(
        authors_state
    )
    torch.save(published, tmp_path / "published.pt")
    one = load_checkpoint_file(tmp_path / "published.pt")
    other = load_checkpoint_file(_authors_file(authors_state, tmp_path / "best_collision_model.pth"))
    assert (one.layout, other.layout) == ("published", "authors")
    assert one.describe() == other.describe() == "1407-256-128-128->64 | 3x32"
    assert [layer.relu for layer in other.layers] == [True, True, True, False]
    for mine, theirs in zip(one.layers, other.layers, strict=True):
        np.testing.assert_array_equal(mine.weight, theirs.weight)
        np.testing.assert_array_equal(mine.bias, theirs.bias)
    rows = SparseRows.from_dense(features)
    codes, vectors = Encoder(one).encode(rows)
    authors_codes, authors_vectors = Encoder(other).encode(rows)
    np.testing.assert_array_equal(authors_codes, codes)
    np.testing.assert_array_equal(authors_vectors, vectors)
    assert len(np.unique(codes[:, 0])) > 8  # a real spread of SIDs, not one bucket


class AuthorsMLP(nn.Module):
    """GNPR-SID's MLPLayers as published: per layer Dropout, Linear, BatchNorm1d (``bn``), ReLU (not after the last).

    ``linear_first`` gives the V2 / LC-Rec order instead: Linear, BatchNorm1d (not after the last), ReLU, Dropout.
    """

    def __init__(self, dims: list[int], bn: bool, linear_first: bool = False) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        for index, (size_in, size_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            last = index == len(dims) - 2
            block: list[nn.Module] = [nn.Linear(size_in, size_out)]
            if bn and not (linear_first and last):
                block.append(nn.BatchNorm1d(size_out))
            if not last:
                block.append(nn.ReLU())
            modules += [*block, nn.Dropout(0.1)] if linear_first else [nn.Dropout(0.1), *block]
        self.mlp_layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_layers(x)


class AuthorsQuantizer(nn.Module):
    def __init__(self, size: int, dim: int, use_linear: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        if use_linear:
            self.codebook_projection = nn.Linear(dim, dim)

    def codebook(self) -> torch.Tensor:
        book = self.embedding.weight
        return self.codebook_projection(book) if hasattr(self, "codebook_projection") else book


class AuthorsRQVAE(nn.Module):
    """The module tree of GNPR-SID's ``RQVAE`` (encoder, rq.vq_layers, decoder, sigmoid), so its keys are real."""

    def __init__(self, dims: list[int], sizes: list[int], bn: bool, linear_first: bool, use_linear: bool) -> None:
        super().__init__()
        self.encoder = AuthorsMLP(dims, bn, linear_first)
        self.rq = nn.Module()
        self.rq.vq_layers = nn.ModuleList(AuthorsQuantizer(size, dims[-1], use_linear) for size in sizes)
        self.decoder = AuthorsMLP(dims[::-1], bn, linear_first)
        self.sigmoid = nn.Sigmoid()


@torch.no_grad()
def _reference(model: AuthorsRQVAE, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-codeword residual quantization of the eval-mode float64 encoder, written out plainly."""
    model = model.double().eval()
    residual = model.encoder(torch.from_numpy(features).double())
    codes, vector = [], torch.zeros(residual.shape, dtype=torch.float32)
    for quantizer in model.rq.vq_layers:
        book = quantizer.codebook().float().double()  # codewords are float32 values, as in the authors' model
        chosen = ((residual[:, None, :] - book[None]) ** 2).sum(-1).argmin(1)
        codes.append(chosen)
        residual = residual - book[chosen]
        vector = vector + book[chosen].float()
    return torch.stack(codes, 1).numpy(), vector.numpy()


@pytest.mark.parametrize(
    ("bn", "linear_first", "use_linear"),
    [(True, False, False), (False, False, False), (True, False, True), (True, True, False)],
    ids=["bn-incl-after-last", "no-bn", "codebook-projection", "linear-first-order"],
)
def test_authors_layout_against_reference(tmp_path, features, bn, linear_first, use_linear):
    torch.manual_seed(7)
    model = AuthorsRQVAE([features.shape[1], 96, 48, 32], [16, 16, 16], bn, linear_first, use_linear)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.from_numpy(features[:64])
    model.train()
    model.sigmoid(model.decoder(model.encoder(batch))).square().mean().backward()
    optimizer.step()  # moves the weights and fills real AdamW state, as in a saved training checkpoint
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.running_mean.normal_(0.0, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
        residual = model.eval().encoder(torch.from_numpy(features))
        for quantizer in model.rq.vq_layers:  # codewords drawn from the data, so SIDs spread out
            quantizer.embedding.weight.copy_(residual[torch.randperm(len(residual))[:16]])
            if use_linear:
                quantizer.codebook_projection.weight.copy_(torch.eye(32) + 0.05 * torch.randn(32, 32))
                quantizer.codebook_projection.bias.copy_(0.001 * torch.randn(32))
            book = quantizer.codebook()
            residual = residual - book[((residual[:, None] - book) ** 2).sum(-1).argmin(1)]
    state = model.state_dict()
    if bn and not linear_first:
        assert "encoder.mlp_layers.10.running_var" in state  # the authors' BatchNorm after the last Linear
    weights = load_checkpoint_file(_authors_file(state, tmp_path / "best.pth", optimizer.state_dict()))
    assert weights.layout == "authors" and weights.describe() == "1407-96-48->32 | 3x16"
    assert [layer.relu for layer in weights.layers] == [True, True, False]
    codes, vectors = Encoder(weights).encode(SparseRows.from_dense(features))
    ref_codes, ref_vectors = _reference(model, features)
    np.testing.assert_array_equal(codes, ref_codes)
    np.testing.assert_array_equal(vectors, ref_vectors)
    assert len(np.unique(codes, axis=0)) > ROWS // 10  # a real spread of SIDs


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_loads_the_same(tmp_path, published, protocol):
    baseline = checkpoint.weights_from_checkpoint(published)
    path = tmp_path / "model.pt"
    torch.save({**published, "args": _args(use_sk=True)}, path, pickle_protocol=protocol)
    weights = load_checkpoint_file(path)
    assert weights.sinkhorn == ((3, 0.003),)
    for mine, theirs in zip(weights.layers, baseline.layers, strict=True):
        np.testing.assert_array_equal(mine.weight, theirs.weight)
    for mine, theirs in zip(weights.codebooks, baseline.codebooks, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_unknown_layout_names_the_keys_seen(tmp_path):
    state = {"encoder.net.0.weight": torch.zeros(4, 3), "quantizer.codebooks.0": torch.zeros(8, 4)}
    torch.save({"state_dict": state}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as caught:
        load_checkpoint_file(tmp_path / "odd.pt")
    assert "encoder.net" in str(caught.value) and "quantizer.codebooks" in str(caught.value)
    torch.save({"model": {"encoder.net.0.weight": [1.0]}, "epoch": 3}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match=r"no tensors found \(keys seen: epoch, model\)"):
        load_checkpoint_file(tmp_path / "none.pt")


def test_gnpr_sid_v2_cosine_quantizer_is_refused(tmp_path, published):
    state = _to_authors_layout(published["model_state_dict"], 64)
    state["rq.vq_layers.0.ema_w"] = torch.zeros(32, 64)
    with pytest.raises(CheckpointError, match=r"'rq\.vq_layers\.0\.ema_w' marks a GNPR-SID V2 CRQVAE"):
        load_checkpoint_file(_authors_file(state, tmp_path / "v2.pth"))


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_file_is_corrupt(tmp_path, published, cut):
    path = _authors_file(_to_authors_layout(published["model_state_dict"], 64), tmp_path / "best.pth")
    data = path.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint_bytes(data[: int(len(data) * cut)], source="best.pth")


class Payload:
    """Unpickling this would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class TaggedDict(collections.OrderedDict):
    """A harmless-looking OrderedDict subclass, still outside the allowlist."""


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("where", ["top", "in-args", "in-state"])
def test_pickled_code_is_refused_and_never_runs(tmp_path, published, protocol, where):
    marker = tmp_path / "pwned"
    state = dict(published["model_state_dict"])
    payload = {**published, "args": _args()}
    if where == "top":
        payload["hook"] = Payload(marker)
    elif where == "in-args":
        payload["args"] = _args(callback=Payload(marker))
    else:
        payload["model_state_dict"] = {**state, "extra": Payload(marker)}
    torch.save(payload, tmp_path / "evil.pt", pickle_protocol=protocol)
    with pytest.raises(CheckpointError, match="refused to load: it needs the Python global '(os|posix).system'"):
        load_checkpoint_file(tmp_path / "evil.pt")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        (argparse.Namespace(when=datetime.date(2025, 1, 1)), "datetime.date"),
        (TaggedDict(a=1), f"{__name__}.TaggedDict"),
        (collections.defaultdict(int), "collections.defaultdict"),
    ],
    ids=["namespace-holding-a-date", "ordereddict-subclass", "defaultdict"],
)
def test_globals_outside_the_allowlist_are_refused(tmp_path, published, extra, name):
    torch.save({**published, "args": extra}, tmp_path / "x.pt", pickle_protocol=4)
    with pytest.raises(CheckpointError, match=f"refused to load: it needs the Python global '{name}'"):
        load_checkpoint_file(tmp_path / "x.pt")


def _with_pickle(pkl: bytes) -> bytes:
    """A torch archive whose ``data.pkl`` is ``pkl`` (for pickles that ``torch.save`` would never write)."""
    buffer = io.BytesIO()
    torch.save({}, buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(out, "w") as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, pkl if entry.filename.endswith("/data.pkl") else src.read(entry))
    return out.getvalue()


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _short_string(text: str) -> bytes:
    return b"\x8c" + bytes([len(text)]) + text.encode()


def test_argument_parser_and_namespace_abuse(monkeypatch):
    # argparse.ArgumentParser (protocol 4, STACK_GLOBAL) is refused by name.
    parser = b"\x80\x04" + _short_string("argparse") + _short_string("ArgumentParser") + b"\x93)R."
    with pytest.raises(CheckpointError, match="refused to load: it needs the Python global 'argparse.ArgumentParser'"):
        load_checkpoint_bytes(_with_pickle(parser))
    # Calling Namespace with arguments fails cleanly.
    called = b"\x80\x02" + _global("argparse", "Namespace") + b"(K\x01tR."
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint_bytes(_with_pickle(called))
    # A Namespace whose pickled state would set __class__ (to a storage type) loads as the inert stand-in.
    seen = []
    monkeypatch.setattr(checkpoint, "weights_from_checkpoint", lambda obj, **_: seen.append(obj))
    klass = b"X\x09\x00\x00\x00__class__" + _global("torch.storage", "TypedStorage")
    confused = b"\x80\x02}X\x04\x00\x00\x00args" + _global("argparse", "Namespace") + b")RN}" + klass + b"s\x86bs."
    load_checkpoint_bytes(_with_pickle(confused))
    assert type(seen[0]["args"]).__name__ == "_TrainingArgs"
    assert not hasattr(seen[0]["args"], "__dict__")


def test_real_namespace_args_load(tmp_path, published):
    torch.save({**published, "args": _args(layers=[512, 256, 128], lamda=0.0)}, tmp_path / "ok.pt")
    assert load_checkpoint_file(tmp_path / "ok.pt").layout == "published"


def _batchnorm(index: int, size: int) -> dict[str, torch.Tensor]:
    stats = {"weight": torch.ones(size), "bias": torch.zeros(size)}
    stats.update(running_mean=torch.zeros(size), running_var=torch.ones(size))
    return {f"encoder.mlp_layers.{index}.{name}": value for name, value in stats.items()}


BAD_STATES = {
    "missing-bn-stat": (lambda s: s.pop("encoder.mlp_layers.6.running_var"), "encoder.mlp_layers.6.running_var"),
    "missing-linear": (lambda s: s.pop("encoder.mlp_layers.5.weight"), "encoder.mlp_layers.5.weight"),
    "missing-codebook": (lambda s: s.pop("rq.vq_layers.0.embedding.weight"), "rq.vq_layers.0.embedding.weight"),
    "codebook-dim": (
        lambda s: s.update({"rq.vq_layers.1.embedding.weight": torch.zeros(32, 16)}),
        "rq.vq_layers.1.embedding.weight",
    ),
    "linear-inputs": (
        lambda s: s.update({"encoder.mlp_layers.9.weight": torch.zeros(128, 100)}),
        "encoder.mlp_layers.9.weight",
    ),
    "bn-size": (
        lambda s: s.update({"encoder.mlp_layers.2.running_mean": torch.zeros(3)}),
        "encoder.mlp_layers.2.running_mean",
    ),
    "bn-after-a-gap": (lambda s: s.update(_batchnorm(15, 64)), "encoder.mlp_layers.15"),
    "bn-after-bn": (lambda s: s.update(_batchnorm(3, 256)), "encoder.mlp_layers.3"),
    "linear-without-activation": (
        lambda s: s.update({"encoder.mlp_layers.3.weight": torch.zeros(256, 256)}),
        "encoder.mlp_layers.3",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_bad_state_names_the_key(tmp_path, published, case):
    change, key = BAD_STATES[case]
    state = _to_authors_layout(published["model_state_dict"], 64)
    change(state)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint_file(_authors_file(state, tmp_path / "bad.pth"))
    assert f"'{key}" in str(caught.value), str(caught.value)


@pytest.fixture(scope="module")
def authors_state(published) -> dict[str, torch.Tensor]:
    return _to_authors_layout(published["model_state_dict"], 64)


@pytest.fixture(scope="module")
def nearest_sids(published, features) -> tuple[np.ndarray, np.ndarray]:
    """The SIDs of the published weights, loaded without any training arguments."""
    return Encoder(checkpoint.weights_from_checkpoint(published)).encode(SparseRows.from_dense(features))


MISSING = object()
SINKHORN_ARGS = {
    "sk-off": ({"use_sk": False, "sk_epsilons": [0.0, 0.0, 0.003]}, ()),
    "sk-on-last-level": ({"use_sk": True, "sk_epsilons": [0.0, 0.0, 0.003]}, ((3, 0.003),)),
    "sk-on-zero-epsilons": ({"use_sk": True, "sk_epsilons": [0.0, 0.0, 0.0]}, ()),
    "sk-on-two-levels": ({"use_sk": True, "sk_epsilons": [0.01, 0.0, 0.003]}, ((1, 0.01), (3, 0.003))),
    "negative-epsilon": ({"use_sk": True, "sk_epsilons": [-0.5, 0.02, 0]}, ((2, 0.02),)),
    "int-flag-and-tuple": ({"use_sk": 1, "sk_epsilons": (0, 0, 1)}, ((3, 1.0),)),
    "more-epsilons-than-levels": (
        {"use_sk": True, "sk_epsilons": [0.1, 0.2, 0.3, 0.4]},
        ((1, 0.1), (2, 0.2), (3, 0.3)),
    ),
    "fewer-epsilons-than-levels": ({"use_sk": True, "sk_epsilons": [0.0, 0.5]}, ((2, 0.5),)),
    "no-sk-epsilons": ({"use_sk": True, "sk_epsilons": MISSING}, ()),
    "no-use-sk": ({"use_sk": MISSING, "sk_epsilons": [0.0, 0.0, 0.003]}, ()),
    "use-sk-string": ({"use_sk": "True", "sk_epsilons": [0.0, 0.0, 0.003]}, ()),
    "use-sk-float": ({"use_sk": 1.0, "sk_epsilons": [0.0, 0.0, 0.003]}, ()),
    "epsilons-string": ({"use_sk": True, "sk_epsilons": "0.0 0.0 0.003"}, ()),
    "epsilon-string-item": ({"use_sk": True, "sk_epsilons": [0.0, 0.0, "0.003"]}, ()),
    "epsilon-bool-item": ({"use_sk": True, "sk_epsilons": [0.0, 0.0, True]}, ()),
    "epsilon-nan": ({"use_sk": True, "sk_epsilons": [0.0, 0.0, float("nan")]}, ()),
    "epsilon-huge-int": ({"use_sk": True, "sk_epsilons": [0, 0, 10**400]}, ()),
    "epsilons-tensor": ({"use_sk": True, "sk_epsilons": torch.tensor([0.0, 0.0, 0.003])}, ()),
    "epsilons-dict": ({"use_sk": True, "sk_epsilons": {2: 0.003}}, ()),
    "nested-namespace": ({"use_sk": argparse.Namespace(value=True), "sk_epsilons": [0.0, 0.0, 0.003]}, ()),
    "nested-lists": ({"use_sk": True, "sk_epsilons": [[0.0], [0.0], [0.003]]}, ()),
}


@pytest.mark.parametrize("case", list(SINKHORN_ARGS) + ["args-missing", "args-not-a-namespace"])
def test_sinkhorn_levels_come_from_the_training_args(tmp_path, authors_state, features, nearest_sids, case):
    payload: dict[str, object] = {"epoch": 1000, "state_dict": authors_state}
    expected: tuple = ()
    if case == "args-not-a-namespace":
        payload["args"] = {"use_sk": True, "sk_epsilons": [0.0, 0.0, 0.003]}
    elif case != "args-missing":
        settings, expected = SINKHORN_ARGS[case]
        args = _args()
        for name, value in settings.items():
            if value is MISSING:
                delattr(args, name)
            else:
                setattr(args, name, value)
        payload["args"] = args
    torch.save(payload, tmp_path / "best.pth", pickle_protocol=4)
    weights = load_checkpoint_file(tmp_path / "best.pth")
    assert weights.sinkhorn == expected
    assert weights.sinkhorn_levels == tuple(level for level, _ in expected)
    assert weights.describe() == "1407-256-128-128->64 | 3x32"
    codes, vectors = Encoder(weights).encode(SparseRows.from_dense(features))
    np.testing.assert_array_equal(codes, nearest_sids[0])  # the note changes, the SIDs never do
    np.testing.assert_array_equal(vectors, nearest_sids[1])
    note = weights.sinkhorn_note()
    if not expected:
        assert note is None
    else:
        assert "\n" not in note and "SIDs use the nearest codeword" in note and "see README" in note


def test_sinkhorn_note_names_levels_and_epsilons(published):
    base = checkpoint.weights_from_checkpoint(published)
    one = dataclasses.replace(base, sinkhorn=((3, 0.003),))
    assert one.sinkhorn_note() == (
        "trained with Sinkhorn assignment at level 3 (epsilon 0.003); SIDs use the nearest codeword, "
        "as batch-invariant inference must — see README"
    )
    three = dataclasses.replace(base, sinkhorn=((1, 0.01), (2, 0.005), (3, 0.003)))
    assert three.sinkhorn_note().startswith(
        "trained with Sinkhorn assignment at levels 1, 2 and 3 (epsilon 0.01, 0.005, 0.003); "
    )
    assert base.sinkhorn == () and base.sinkhorn_note() is None


def _binfloat(value: float) -> bytes:
    return b"G" + struct.pack(">d", value)


def _string(text: str) -> bytes:
    return b"X" + struct.pack("<I", len(text)) + text.encode()


NAMESPACE = _global("argparse", "Namespace") + b")R"  # argparse.Namespace() as the stand-in, on the stack
HOSTILE_ARGS = {
    # BUILD with (dict state, slot state) aiming at the stand-in's own slot.
    "slot-state": NAMESPACE + b"N}" + _string("_epsilons") + b"]" + _binfloat(0.5) + b"as\x86b",
    # The dict state names the slot and the property directly, with Sinkhorn off.
    "slot-in-dict": NAMESPACE
    + b"}"
    + _string("_epsilons")
    + b"]"
    + _binfloat(0.5)
    + b"as"
    + _string("sinkhorn_epsilons")
    + b"]"
    + _binfloat(0.5)
    + b"as"
    + _string("use_sk")
    + b"\x89sb",
    # A state that is not a dict at all.
    "list-state": NAMESPACE + b"]" + _binfloat(0.5) + b"ab",
    # No state: BUILD never runs.
    "no-state": NAMESPACE,
}


@pytest.mark.parametrize("case", sorted(HOSTILE_ARGS))
def test_hostile_namespace_cannot_set_sinkhorn_or_attributes(monkeypatch, case):
    seen = []
    monkeypatch.setattr(checkpoint, "weights_from_checkpoint", lambda obj, **_: seen.append(obj))
    load_checkpoint_bytes(_with_pickle(b"\x80\x02}" + _string("args") + HOSTILE_ARGS[case] + b"s."))
    args = seen[0]["args"]
    assert type(args).__name__ == "_TrainingArgs"
    assert args.sinkhorn_epsilons == ()
    assert not hasattr(args, "__dict__")
    with pytest.raises(AttributeError):
        args.lr = 1.0


def test_namespace_keeps_only_the_sinkhorn_settings(tmp_path, authors_state, monkeypatch):
    seen = []
    monkeypatch.setattr(checkpoint, "weights_from_checkpoint", lambda obj, **_: seen.append(obj))
    args = _args(use_sk=True, sk_epsilons=[0.0, 0.25, 0.003], extra=argparse.Namespace(depth=[1, 2]))
    torch.save({"args": args, "state_dict": authors_state}, tmp_path / "best.pth", pickle_protocol=4)
    load_checkpoint_file(tmp_path / "best.pth")
    loaded = seen[0]["args"]
    assert loaded.sinkhorn_epsilons == (0.0, 0.25, 0.003)
    assert type(loaded).__slots__ == ("_epsilons",) and not hasattr(loaded, "__dict__")
    assert not any(hasattr(loaded, name) for name in ("lr", "use_sk", "sk_epsilons", "extra", "device"))


def test_code_in_the_sinkhorn_settings_never_runs(tmp_path, authors_state):
    marker = tmp_path / "pwned"
    torch.save({"args": _args(use_sk=True, sk_epsilons=Payload(marker)), "state_dict": authors_state}, tmp_path / "x")
    with pytest.raises(CheckpointError, match="refused to load: it needs the Python global '(os|posix).system'"):
        load_checkpoint_file(tmp_path / "x")
    assert not marker.exists()


def test_checkpoints_with_training_arguments_load_from_several_threads_at_once(published):
    """Datasets load side by side, each in a thread: torch's allowlist for the training arguments is process-wide, and
    one load leaving it must not take it from another still reading."""
    from concurrent.futures import ThreadPoolExecutor

    buffer = io.BytesIO()
    torch.save({**published, "args": _args(use_sk=True)}, buffer)
    data = buffer.getvalue()
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: load_checkpoint_bytes(data), range(16)))
    assert all(weights.sinkhorn == ((3, 0.003),) for weights in loaded)
