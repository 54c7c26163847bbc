"""Checkpoints: safe loading of RQ-VAE state dicts and extraction of the frozen encoder + quantizer.

Two layouts are understood, detected from the keys:

* published (comp5331poi ``rqvae_best.pt``): ``model_state_dict`` with ``encoder.layers.{i}`` Linear/BatchNorm1d
  blocks (each followed by ReLU, Dropout), ``encoder.proj`` and ``quantizer.quantizers.{l}.vectors.weight``;
* paper authors' (GNPR-SID ``codebook.py``): ``state_dict`` with ``encoder.mlp_layers.{i}`` Linear layers (optional
  BatchNorm1d, ReLU between them, nothing after the last) and ``rq.vq_layers.{l}.embedding.weight``.

The architecture (input dim, hidden sizes, latent dim, levels, codebook sizes) is read from tensor shapes only.
BatchNorm is folded into the preceding Linear in float64 at load time; the result is an immutable
:class:`ModelWeights` of numpy arrays that actors receive through the Ray object store.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCHNORM_EPS = 1e-5


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


@dataclass(frozen=True)
class Layer:
    """One affine layer ``y = x @ weight.T + bias`` (BatchNorm folded in), optionally followed by ReLU."""

    weight: np.ndarray  # float64 [out, in]
    bias: np.ndarray  # float64 [out]
    relu: bool


@dataclass(frozen=True)
class ModelWeights:
    """The frozen encoder and residual quantizer of one RQ-VAE."""

    layers: tuple[Layer, ...]
    codebooks: tuple[np.ndarray, ...]  # float32 [K_l, latent]
    layout: str
    sha256: str

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def latent_dim(self) -> int:
        return int(self.codebooks[0].shape[1])

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[0]) for c in self.codebooks)

    def describe(self) -> str:
        """Architecture summary such as ``1407-512-256-128->64 | 3x32``."""
        dims = [str(self.input_dim)] + [str(layer.weight.shape[0]) for layer in self.layers[:-1]]
        sizes = self.codebook_sizes
        books = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))
        return f"{'-'.join(dims)}->{self.latent_dim} | {books}"


def load_checkpoint_file(path: str | Path) -> ModelWeights:
    """Load a checkpoint file from disk; see :func:`load_checkpoint_bytes`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    return load_checkpoint_bytes(data, source=str(path))


def load_checkpoint_bytes(data: bytes, source: str = "checkpoint") -> ModelWeights:
    """Load a checkpoint from its bytes with ``torch.load(weights_only=True)`` and extract the frozen model."""
    import torch

    if not data:
        raise CheckpointError(f"{source}: the file is empty; re-download or re-export the checkpoint")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe content"
        raise CheckpointError(
            f"{source}: refused to load: it holds Python objects outside the tensor allowlist ({first[:160]}); "
            "only plain state-dict checkpoints are accepted, re-save it with torch.save(state_dict)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{source}: corrupt or truncated checkpoint ({first[:160]}); re-download or re-export it"
        ) from None
    return weights_from_checkpoint(obj, source=source, sha256=hashlib.sha256(data).hexdigest())


def _state_dict(obj: object, source: str) -> dict[str, np.ndarray]:
    import torch

    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{source}: no state dict found (expected a dict with 'model_state_dict')")
    state: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[str(key)] = value.detach().cpu().numpy()
    return state


def weights_from_checkpoint(obj: object, source: str = "checkpoint", sha256: str = "") -> ModelWeights:
    """Build :class:`ModelWeights` from a loaded checkpoint object (published or authors' layout)."""
    state = _state_dict(obj, source)
    if any(k.startswith("encoder.layers.") for k in state) and any(
        k.startswith("quantizer.quantizers.") for k in state
    ):
        layers = _published_encoder(state, source)
        codebooks = _codebooks(state, r"quantizer\.quantizers\.(\d+)\.vectors\.weight", source)
        layout = "published"
    elif any(k.startswith("encoder.mlp_layers.") for k in state) and any(k.startswith("rq.vq_layers.") for k in state):
        layers = _authors_encoder(state, source)
        codebooks = _codebooks(state, r"rq\.vq_layers\.(\d+)\.embedding\.weight", source)
        layout = "authors"
    else:
        seen = sorted({".".join(k.split(".")[:2]) for k in state})
        raise CheckpointError(
            f"{source}: unknown checkpoint layout (key prefixes seen: {', '.join(seen[:12])}); expected "
            "'encoder.layers.*' + 'quantizer.quantizers.*' (published) or 'encoder.mlp_layers.*' + 'rq.vq_layers.*'"
        )
    weights = ModelWeights(layers=tuple(layers), codebooks=tuple(codebooks), layout=layout, sha256=sha256)
    _check_shapes(weights, source)
    return weights


def _indexed(state: dict[str, np.ndarray], prefix: str) -> dict[int, dict[str, np.ndarray]]:
    modules: dict[int, dict[str, np.ndarray]] = {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    for key, value in state.items():
        match = pattern.match(key)
        if match:
            modules.setdefault(int(match.group(1)), {})[match.group(2)] = value
    return modules


def _get(module: dict[str, np.ndarray], name: str, key: str, source: str) -> np.ndarray:
    if name not in module:
        raise CheckpointError(f"{source}: missing key '{key}.{name}'; the state dict is incomplete")
    return module[name]


def _linear(module: dict[str, np.ndarray], key: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    weight = _get(module, "weight", key, source)
    if weight.ndim != 2:
        raise CheckpointError(f"{source}: '{key}.weight' has shape {list(weight.shape)}, expected a 2-D Linear weight")
    bias = module.get("bias", np.zeros(weight.shape[0], dtype=weight.dtype))
    if bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"{source}: '{key}.bias' has shape {list(bias.shape)}, expected [{weight.shape[0]}] to match the weight"
        )
    return weight.astype(np.float64), bias.astype(np.float64)


def _fold_batchnorm(
    weight: np.ndarray, bias: np.ndarray, bn: dict[str, np.ndarray], key: str, source: str
) -> tuple[np.ndarray, np.ndarray]:
    parts = {name: _get(bn, name, key, source).astype(np.float64) for name in ("running_mean", "running_var")}
    gamma = bn.get("weight", np.ones(weight.shape[0])).astype(np.float64)
    beta = bn.get("bias", np.zeros(weight.shape[0])).astype(np.float64)
    for name, value in (*parts.items(), ("weight", gamma), ("bias", beta)):
        if value.shape != (weight.shape[0],):
            raise CheckpointError(
                f"{source}: '{key}.{name}' has shape {list(value.shape)}, expected [{weight.shape[0]}] "
                "to match the preceding Linear"
            )
    if (parts["running_var"] < 0).any():
        raise CheckpointError(f"{source}: '{key}.running_var' has negative entries; the checkpoint is corrupt")
    scale = gamma / np.sqrt(parts["running_var"] + BATCHNORM_EPS)
    return weight * scale[:, None], (bias - parts["running_mean"]) * scale + beta


def _published_encoder(state: dict[str, np.ndarray], source: str) -> list[Layer]:
    modules = _indexed(state, "encoder.layers.")
    layers: list[Layer] = []
    pending: tuple[np.ndarray, np.ndarray] | None = None
    for index in sorted(modules):
        module, key = modules[index], f"encoder.layers.{index}"
        if "running_mean" in module or "running_var" in module:
            if pending is None:
                raise CheckpointError(f"{source}: '{key}' is a BatchNorm with no Linear before it")
            pending = _fold_batchnorm(*pending, module, key, source)
        elif "weight" in module:
            if pending is not None:
                layers.append(Layer(*pending, relu=True))
            pending = _linear(module, key, source)
    if pending is None:
        raise CheckpointError(f"{source}: 'encoder.layers.*' holds no Linear layer")
    layers.append(Layer(*pending, relu=True))
    proj = {k[len("encoder.proj.") :]: v for k, v in state.items() if k.startswith("encoder.proj.")}
    if not proj:
        raise CheckpointError(f"{source}: missing key 'encoder.proj.weight'; the state dict is incomplete")
    layers.append(Layer(*_linear(proj, "encoder.proj", source), relu=False))
    return layers


def _authors_encoder(state: dict[str, np.ndarray], source: str) -> list[Layer]:
    modules = _indexed(state, "encoder.mlp_layers.")
    linears: list[tuple[np.ndarray, np.ndarray]] = []
    for index in sorted(modules):
        module, key = modules[index], f"encoder.mlp_layers.{index}"
        if "running_mean" in module or "running_var" in module:
            if not linears:
                raise CheckpointError(f"{source}: '{key}' is a BatchNorm with no Linear before it")
            linears[-1] = _fold_batchnorm(*linears[-1], module, key, source)
        elif "weight" in module:
            linears.append(_linear(module, key, source))
    if not linears:
        raise CheckpointError(f"{source}: 'encoder.mlp_layers.*' holds no Linear layer")
    return [Layer(w, b, relu=i < len(linears) - 1) for i, (w, b) in enumerate(linears)]


def _codebooks(state: dict[str, np.ndarray], pattern: str, source: str) -> list[np.ndarray]:
    found: dict[int, np.ndarray] = {}
    for key, value in state.items():
        match = re.fullmatch(pattern, key)
        if match:
            found[int(match.group(1))] = value
    if not found:
        raise CheckpointError(f"{source}: no codebook tensors found (pattern {pattern})")
    if sorted(found) != list(range(len(found))):
        raise CheckpointError(f"{source}: codebook levels {sorted(found)} are not numbered 0..{len(found) - 1}")
    books = [found[level].astype(np.float32) for level in range(len(found))]
    for level, book in enumerate(books):
        if book.ndim != 2 or book.shape[0] < 1:
            raise CheckpointError(f"{source}: codebook of level {level} has shape {list(book.shape)}, expected [K, d]")
    return books


def _check_shapes(weights: ModelWeights, source: str) -> None:
    width = weights.layers[0].weight.shape[1]
    for index, layer in enumerate(weights.layers):
        if layer.weight.shape[1] != width:
            raise CheckpointError(
                f"{source}: encoder layer {index} takes {layer.weight.shape[1]} inputs but the layer before gives "
                f"{width}; the state dict has inconsistent shapes"
            )
        width = layer.weight.shape[0]
        if not (np.isfinite(layer.weight).all() and np.isfinite(layer.bias).all()):
            raise CheckpointError(f"{source}: encoder layer {index} has NaN or Inf weights; the checkpoint is broken")
    for level, book in enumerate(weights.codebooks):
        if book.shape[1] != width:
            raise CheckpointError(
                f"{source}: codebook of level {level} has dimension {book.shape[1]} but the encoder outputs {width}; "
                "the state dict has inconsistent shapes"
            )
        if not np.isfinite(book).all():
            raise CheckpointError(f"{source}: codebook of level {level} has NaN or Inf entries")
