"""Checkpoints: safe loading of RQ-VAE state dicts and extraction of the frozen encoder + quantizer.

Two layouts are understood, detected from the keys:

* published (comp5331poi ``rqvae_best.pt``): ``model_state_dict`` with ``encoder.layers.{i}`` Linear/BatchNorm1d
  blocks (each followed by ReLU, Dropout), ``encoder.proj`` and ``quantizer.quantizers.{l}.vectors.weight``;
* paper authors' (GNPR-SID ``RQVAE``, saved by its trainer as ``{"args": Namespace, "state_dict": ..., "optimizer":
  ...}`` with pickle protocol 4): ``state_dict`` with ``encoder.mlp_layers.{i}``, an ``nn.Sequential`` of Dropout,
  Linear, BatchNorm1d when trained with ``--bn`` (after the last Linear too) and ReLU (not after the last Linear), and
  ``rq.vq_layers.{l}.embedding.weight`` (with ``codebook_projection``, trained with ``--use-liner 1``, the projected
  codebook is the codebook, as in the authors' quantizer). Other orders that keep each BatchNorm directly after its
  Linear and a parameter-free module between Linears (e.g. Linear, BatchNorm, ReLU, Dropout) read the same way.
  SIDs are always the nearest codewords: the authors' own inference uses Sinkhorn assignment (batch dependent) when
  trained with ``--use_sk`` and a positive epsilon, which is deliberately not reproduced; :attr:`ModelWeights.sinkhorn`
  records those levels so that the run can say so. GNPR-SID V2's cosine quantizer (``ema_w`` buffers) is refused.

The architecture (input dim, hidden sizes, latent dim, levels, codebook sizes) is read from tensor shapes only.
BatchNorm is folded into the preceding Linear in float64 at load time; the result is an immutable
:class:`ModelWeights` of numpy arrays that actors receive through the Ray object store.

Loading always goes through ``torch.load(weights_only=True)``. The only global allowed beyond torch's defaults is
``argparse.Namespace``, and it unpickles as an inert stand-in that reads only ``use_sk`` and ``sk_epsilons``, and
those only when they are plain values. Pickles of protocol 3-5 (which torch's restricted unpickler cannot read) are
first rewritten opcode by opcode to protocol 2 without executing anything; torch's unpickler still decides what may
be built. No tensor may claim more bytes than the file holds: a first load on the meta device, which reads no tensor
data, checks every declared size before the real load, and no archive record may unpack to more than the file holds.
Half-precision weights become float32, which holds them exactly; any failure is a :class:`CheckpointError`.
"""

from __future__ import annotations

import hashlib
import io
import math
import pickle
import pickletools
import re
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rqvae_ray.errors import CheckpointError

if TYPE_CHECKING:
    import torch

BATCHNORM_EPS = 1e-5
_ALLOWLIST_LOCK = threading.Lock()


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
    sinkhorn: tuple[tuple[int, float], ...] = ()  # (level from 1, epsilon) the authors' inference assigns by Sinkhorn

    @property
    def input_dim(self) -> int:
        return int(self.layers[0].weight.shape[1])

    @property
    def latent_dim(self) -> int:
        return int(self.codebooks[0].shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the weights in memory."""
        arrays = [a for layer in self.layers for a in (layer.weight, layer.bias)] + list(self.codebooks)
        return sum(a.nbytes for a in arrays)

    @property
    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(int(c.shape[0]) for c in self.codebooks)

    def describe(self) -> str:
        """Architecture summary such as ``1407-512-256-128->64 | 3x32``."""
        dims = [str(self.input_dim)] + [str(layer.weight.shape[0]) for layer in self.layers[:-1]]
        sizes = self.codebook_sizes
        books = f"{len(sizes)}x{sizes[0]}" if len(set(sizes)) == 1 else "+".join(map(str, sizes))
        return f"{'-'.join(dims)}->{self.latent_dim} | {books}"

    @property
    def sinkhorn_levels(self) -> tuple[int, ...]:
        """Levels (from 1) that the checkpoint trained with Sinkhorn assignment; empty when none or unknown."""
        return tuple(level for level, _ in self.sinkhorn)

    def sinkhorn_note(self) -> str | None:
        """One line saying that Sinkhorn-trained levels are assigned by nearest codeword here, or ``None``."""
        if not self.sinkhorn:
            return None
        levels = " and ".join(", ".join(str(level) for level in self.sinkhorn_levels).rsplit(", ", 1))
        epsilons = ", ".join(f"{epsilon:g}" for _, epsilon in self.sinkhorn)
        return (
            f"trained with Sinkhorn assignment at level{'s' if len(self.sinkhorn) > 1 else ''} {levels} "
            f"(epsilon {epsilons}); SIDs use the nearest codeword, as batch-invariant inference must — see README"
        )


def load_checkpoint_file(path: str | Path) -> ModelWeights:
    """Load a checkpoint file from disk; see :func:`load_checkpoint_bytes`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read the checkpoint: {exc.strerror}") from None
    except MemoryError:
        raise CheckpointError(str(path), "the file is too large to read into memory; is it a checkpoint?") from None
    return load_checkpoint_bytes(data, source=str(path))


def load_checkpoint_bytes(data: bytes, source: str = "checkpoint", sha256: str | None = None) -> ModelWeights:
    """Load a checkpoint from its bytes with ``torch.load(weights_only=True)`` and extract the frozen model
    (``sha256``: the bytes' digest where the caller has taken it already).

    Every failure is a :class:`CheckpointError`: the archive's records and every tensor's declared size are checked
    against the file's size first (a tensor may not claim more bytes than the file could hold), and whatever else
    goes wrong while reading or converting the tensors is reported the same way.
    """
    obj = _load(data, source)
    try:
        return weights_from_checkpoint(obj, source=source, sha256=sha256 or hashlib.sha256(data).hexdigest())
    except CheckpointError:
        raise
    except Exception as exc:  # untrusted content: a failure converting it is this checkpoint's, never the caller's
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__
        raise CheckpointError(source, f"cannot be used ({detail}); re-export the checkpoint") from None


def _load(data: bytes, source: str) -> object:
    """The unpickled checkpoint, its tensors' sizes checked first on a load that reads no tensor data."""
    import torch

    if not data:
        raise CheckpointError(source, "the file is empty; re-download or re-export the checkpoint")
    try:
        archive = _protocol2_archive(data, source)
        # torch's allowlist is one set for the whole process, and leaving safe_globals removes the entry even while
        # another thread's load (datasets load side by side) still needs it: one load at a time.
        with _ALLOWLIST_LOCK, torch.serialization.safe_globals([(_TrainingArgs, "argparse.Namespace")]):
            # On the meta device torch builds every tensor from the pickle's declared sizes without reading data.
            declared = torch.load(io.BytesIO(archive), map_location="meta", weights_only=True)
            _check_tensor_sizes(declared, len(data), source)
            return torch.load(io.BytesIO(archive), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            source,
            f"refused to load: {_refusal_reason(exc)}; only checkpoints of tensors, plain containers and "
            "argparse training arguments are accepted, re-save it with torch.save(state_dict)",
        ) from None
    except Exception:  # untrusted bytes: torch's reader and unpickler fail in many ways (struct, index, assert, ...)
        raise CheckpointError(
            source,
            f"corrupt or truncated checkpoint ({len(data)} bytes, not a complete torch archive); "
            "re-download or re-export it",
        ) from None


def _check_tensor_sizes(obj: object, file_bytes: int, source: str) -> None:
    """Refuse a tensor whose storage, or whose elements (a view may repeat its storage's), take more bytes than the
    whole file holds: a corrupt or hostile size that would otherwise be allocated when the tensor is converted."""
    import torch

    pending: list[tuple[str, object]] = [("", obj)]
    seen: set[int] = set()
    while pending:  # a loop, not recursion: a pickle may nest containers arbitrarily deep, or in a cycle
        name, value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            stored, elements = value.untyped_storage().nbytes(), value.numel() * value.element_size()
            if max(stored, elements) > file_bytes:
                raise CheckpointError(
                    source,
                    f"tensor '{name}' of shape {list(value.shape)} ({value.dtype}) claims {max(stored, elements)} "
                    f"bytes, more than the whole file's {file_bytes}; the checkpoint is corrupt, re-export it",
                )
        elif isinstance(value, dict):
            pending.extend((f"{name}.{key}" if name else str(key), item) for key, item in value.items())
        elif isinstance(value, list | tuple):
            pending.extend((f"{name}[{index}]", item) for index, item in enumerate(value))


class _TrainingArgs:
    """Unpickled in place of ``argparse.Namespace``, the training arguments GNPR-SID checkpoints carry.

    Only the Sinkhorn settings are read from the pickled attributes (see :func:`_sinkhorn_epsilons`); every other one
    is dropped. The file cannot set any attribute on it (not even ``__class__``), and constructing it with arguments
    fails.
    """

    __slots__ = ("_epsilons",)

    def __setstate__(self, state: object) -> None:
        """Keep the per-level Sinkhorn epsilons, drop everything else."""
        self._epsilons = _sinkhorn_epsilons(state)

    @property
    def sinkhorn_epsilons(self) -> tuple[float, ...]:
        """Per level, the epsilon of the authors' Sinkhorn assignment (0 = nearest codeword); empty when unknown."""
        return getattr(self, "_epsilons", ())


def _sinkhorn_epsilons(state: object) -> tuple[float, ...]:
    """``sk_epsilons`` of a Namespace's pickled attributes when ``use_sk`` is on, else ``()``.

    Only plain values count: ``use_sk`` a bool (or int), ``sk_epsilons`` a list or tuple of finite numbers. Anything
    else (a string, a nested object, a tensor) reads as unknown, i.e. no Sinkhorn.
    """
    if not isinstance(state, dict):
        return ()
    use_sk, epsilons = state.get("use_sk"), state.get("sk_epsilons")
    if type(use_sk) not in (bool, int) or not use_sk or type(epsilons) not in (list, tuple):
        return ()
    if not all(type(e) is float or (type(e) is int and abs(e) < 2**53) for e in epsilons):
        return ()
    values = tuple(float(e) for e in epsilons)
    return values if all(map(math.isfinite, values)) else ()


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    text = str(exc)
    named = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if named:
        return f"it needs the Python global '{named.group(1)}', which is not allowlisted"
    detail = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    return f"unsupported or corrupt pickle content ({(lines[0] if lines else 'no detail')[:160]})"


def _protocol2_archive(data: bytes, source: str) -> bytes:
    """The torch zip archive with its pickle rewritten to protocol 2 when it uses a later protocol, else ``data``.

    Records that unpack to more bytes than the file holds (torch stores them uncompressed) are refused unread."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return data
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = archive.infolist()
        unpacked = 0
        for entry in entries:
            unpacked += entry.file_size
            if unpacked > len(data):
                raise CheckpointError(
                    source,
                    f"record '{entry.filename}' unpacks to more bytes than the whole file's {len(data)}; "
                    "the checkpoint is corrupt, re-export it with torch.save",
                )
        pickles = [e for e in entries if e.filename.endswith("/data.pkl")]
        if len(pickles) != 1:
            return data
        pkl = archive.read(pickles[0])
        if len(pkl) < 2 or pkl[0] != pickle.PROTO[0] or pkl[1] <= 2:
            return data
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as rebuilt:
            for entry in entries:
                rebuilt.writestr(entry.filename, _to_protocol2(pkl) if entry is pickles[0] else archive.read(entry))
    return out.getvalue()


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}


def _to_protocol2(pkl: bytes) -> bytes:
    """Rewrite a protocol 3-5 pickle with protocol 2 opcodes; nothing is executed or built.

    FRAME is dropped, MEMOIZE becomes BINPUT and STACK_GLOBAL becomes GLOBAL: the module and name strings it pops
    are held back (with their memo slots) until it is clear whether STACK_GLOBAL consumes them. Every other opcode is
    copied; torch's restricted unpickler rejects the ones it does not support. The output is never longer than the
    input by more than a few bytes per string.
    """
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [ops[-1][2] + 1]
    out = bytearray(b"\x80\x02")
    memo: dict[int, str | None] = {}  # memo slot -> the string it holds, or None for any other object
    emitted: set[int] = set()  # string slots already written to ``out``
    pending: list[list] = []  # strings pushed but not yet written: [value, memo slot or None]

    def flush() -> None:
        for value, slot in pending:
            if slot is not None and slot in emitted:
                out.extend(_memo_op(b"h", b"j", slot))
                continue
            encoded = value.encode("utf-8", "surrogatepass")
            out.extend(b"X" + struct.pack("<I", len(encoded)) + encoded)
            if slot is not None:
                out.extend(_memo_op(b"q", b"r", slot))
                emitted.add(slot)
        pending.clear()

    for (op, arg, pos), end in zip(ops, ends, strict=True):
        if op.name in ("PROTO", "FRAME"):
            continue
        if op.name in _STRING_OPS:
            pending.append([arg, None])
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
            slot = len(memo) if op.name == "MEMOIZE" else arg
            if pending and pending[-1][1] is None:
                pending[-1][1] = slot
                memo[slot] = pending[-1][0]
                emitted.discard(slot)
            else:
                flush()
                out.extend(_memo_op(b"q", b"r", slot))
                memo[slot] = None
        elif op.name in ("BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
            pending.append([memo[arg], arg])
        elif op.name == "STACK_GLOBAL":
            if len(pending) < 2 or any("\n" in value for value, _ in pending[-2:]):
                raise pickle.UnpicklingError("opcode STACK_GLOBAL lacks the module and name strings it needs")
            (module, _), (name, _) = pending[-2:]
            del pending[-2:]
            flush()
            out.extend(f"c{module}\n{name}\n".encode())
        else:
            flush()
            out.extend(pkl[pos:end])
    return bytes(out)


def _memo_op(short: bytes, long: bytes, slot: int) -> bytes:
    return short + bytes([slot]) if slot < 256 else long + struct.pack("<I", slot)


def _state_dict(obj: object, source: str) -> dict[str, np.ndarray]:
    import torch

    if isinstance(obj, dict):
        for key in ("model_state_dict", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(source, "no state dict found (expected a dict with 'model_state_dict')")
    state = {str(k): _array(str(k), v, source) for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        keys = ", ".join(sorted(map(str, obj))[:12])
        raise CheckpointError(source, f"no tensors found (keys seen: {keys}); expected a state dict of tensors")
    return state


def _array(key: str, tensor: torch.Tensor, source: str) -> np.ndarray:
    """A tensor as a numpy array; half precision (float16, bfloat16, float8) becomes float32, which holds it exactly."""
    import torch

    if tensor.is_complex() or tensor.is_quantized:
        raise CheckpointError(source, f"'{key}' has dtype {tensor.dtype}; expected real (floating point) weights")
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    try:
        return tensor.detach().cpu().numpy()
    except (TypeError, RuntimeError):
        raise CheckpointError(source, f"'{key}' has dtype {tensor.dtype}, which numpy cannot hold") from None


def weights_from_checkpoint(obj: object, source: str = "checkpoint", sha256: str = "") -> ModelWeights:
    """Build :class:`ModelWeights` from a loaded checkpoint object (published or authors' layout)."""
    state = _state_dict(obj, source)
    if any(k.startswith("encoder.layers.") for k in state) and any(
        k.startswith("quantizer.quantizers.") for k in state
    ):
        layers = _published_encoder(state, source)
        codebooks = _codebooks(state, "quantizer.quantizers.{}.vectors.weight", _width(layers), source)
        layout = "published"
    elif any(k.startswith("encoder.mlp_layers.") for k in state) and any(k.startswith("rq.vq_layers.") for k in state):
        layers = _authors_encoder(state, source)
        codebooks = _authors_codebooks(state, _width(layers), source)
        layout = "authors"
    else:
        seen = sorted({".".join(k.split(".")[:2]) for k in state})
        raise CheckpointError(
            source,
            f"unknown checkpoint layout (key prefixes seen: {', '.join(seen[:12])}); expected "
            "'encoder.layers.*' + 'quantizer.quantizers.*' (published) or 'encoder.mlp_layers.*' + 'rq.vq_layers.*'",
        )
    args = obj.get("args") if isinstance(obj, dict) else None
    epsilons = args.sinkhorn_epsilons if isinstance(args, _TrainingArgs) else ()
    # As in the authors' quantizer: a level uses Sinkhorn only with a positive epsilon (zip drops extra epsilons).
    sinkhorn = tuple((level + 1, e) for level, e in enumerate(epsilons[: len(codebooks)]) if e > 0)
    weights = ModelWeights(
        layers=tuple(layers), codebooks=tuple(codebooks), layout=layout, sha256=sha256, sinkhorn=sinkhorn
    )
    _check_finite(weights, source)
    return weights


def _width(layers: list[Layer]) -> int:
    return int(layers[-1].weight.shape[0])


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
        raise CheckpointError(source, f"missing key '{key}.{name}'; the state dict is incomplete")
    return module[name]


def _linear(module: dict[str, np.ndarray], key: str, source: str) -> tuple[np.ndarray, np.ndarray]:
    weight = _get(module, "weight", key, source)
    if weight.ndim != 2:
        raise CheckpointError(source, f"'{key}.weight' has shape {list(weight.shape)}, expected a 2-D Linear weight")
    bias = module.get("bias", np.zeros(weight.shape[0], dtype=weight.dtype))
    if bias.shape != (weight.shape[0],):
        raise CheckpointError(
            source, f"'{key}.bias' has shape {list(bias.shape)}, expected [{weight.shape[0]}] to match the weight"
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
                source,
                f"'{key}.{name}' has shape {list(value.shape)}, expected [{weight.shape[0]}] "
                "to match the preceding Linear",
            )
    if (parts["running_var"] < 0).any():
        raise CheckpointError(source, f"'{key}.running_var' has negative entries; the checkpoint is corrupt")
    scale = gamma / np.sqrt(parts["running_var"] + BATCHNORM_EPS)
    return weight * scale[:, None], (bias - parts["running_mean"]) * scale + beta


def _mlp(state: dict[str, np.ndarray], prefix: str, source: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The Linear layers of the ``nn.Sequential`` under ``prefix`` in order, each with its BatchNorm1d folded in.

    Parameter-free modules (ReLU, Dropout) leave gaps in the indices; both layouts put an activation between two
    Linears and a BatchNorm directly after its Linear, so anything else is refused rather than guessed.
    """
    modules = _indexed(state, prefix)
    linears: list[tuple[np.ndarray, np.ndarray]] = []
    last_linear = last_module = -2  # indices of the last Linear and of the last module with parameters
    for index in sorted(modules):
        module, key = modules[index], f"{prefix}{index}"
        if "running_mean" in module or "running_var" in module:
            if last_linear != index - 1:
                raise CheckpointError(
                    source, f"'{key}' is a BatchNorm that does not directly follow a Linear; unsupported layer order"
                )
            linears[-1] = _fold_batchnorm(*linears[-1], module, key, source)
        else:
            if last_module == index - 1:
                raise CheckpointError(
                    source,
                    f"'{key}' directly follows another layer with no activation between them; unsupported layer order",
                )
            weight, bias = _linear(module, key, source)
            if linears:
                _check_chain(weight, linears[-1][0], key, source)
            linears.append((weight, bias))
            last_linear = index
        last_module = index
    if not linears:
        raise CheckpointError(source, f"'{prefix}*' holds no Linear layer")
    return linears


def _check_chain(weight: np.ndarray, before: np.ndarray, key: str, source: str) -> None:
    if weight.shape[1] != before.shape[0]:
        raise CheckpointError(
            source,
            f"'{key}.weight' has shape {list(weight.shape)}: it takes {weight.shape[1]} inputs but the "
            f"layer before gives {before.shape[0]}; the state dict has inconsistent shapes",
        )


def _published_encoder(state: dict[str, np.ndarray], source: str) -> list[Layer]:
    layers = [Layer(w, b, relu=True) for w, b in _mlp(state, "encoder.layers.", source)]
    proj = {k[len("encoder.proj.") :]: v for k, v in state.items() if k.startswith("encoder.proj.")}
    if not proj:
        raise CheckpointError(source, "missing key 'encoder.proj.weight'; the state dict is incomplete")
    weight, bias = _linear(proj, "encoder.proj", source)
    _check_chain(weight, layers[-1].weight, "encoder.proj", source)
    return [*layers, Layer(weight, bias, relu=False)]


def _authors_encoder(state: dict[str, np.ndarray], source: str) -> list[Layer]:
    linears = _mlp(state, "encoder.mlp_layers.", source)
    return [Layer(w, b, relu=i < len(linears) - 1) for i, (w, b) in enumerate(linears)]


def _authors_codebooks(state: dict[str, np.ndarray], width: int, source: str) -> list[np.ndarray]:
    ema = sorted(k for k in state if re.fullmatch(r"rq\.vq_layers\.\d+\.(ema_w|cluster_size)", k))
    if ema:
        raise CheckpointError(
            source,
            f"'{ema[0]}' marks a GNPR-SID V2 CRQVAE, whose quantizer picks codewords by cosine similarity "
            "and scales them; only the nearest-codeword residual quantizer (GNPR-SID RQVAE) is supported",
        )
    books = _codebooks(state, "rq.vq_layers.{}.embedding.weight", width, source)
    for level, book in enumerate(books):
        key = f"rq.vq_layers.{level}.codebook_projection"
        projection = {k[len(key) + 1 :]: v for k, v in state.items() if k.startswith(key + ".")}
        if not projection:
            continue
        weight, bias = _linear(projection, key, source)
        if weight.shape != (width, width):
            raise CheckpointError(
                source,
                f"'{key}.weight' has shape {list(weight.shape)}, expected [{width}, {width}] to match "
                "the codebook; the state dict has inconsistent shapes",
            )
        books[level] = (book.astype(np.float64) @ weight.T + bias).astype(np.float32)
    return books


def _codebooks(state: dict[str, np.ndarray], template: str, width: int, source: str) -> list[np.ndarray]:
    """The codebooks ``template.format(level)`` for levels 0, 1, ..., each ``[K, width]`` as float32."""
    before, after = template.split("{}")
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after))
    found = {int(m.group(1)): value for key, value in state.items() if (m := pattern.fullmatch(key))}
    if not found:
        raise CheckpointError(source, f"missing key '{template.format(0)}'; no codebook tensors found")
    gaps = sorted(set(range(max(found) + 1)) - set(found))
    if gaps:
        raise CheckpointError(
            source, f"missing key '{template.format(gaps[0])}'; codebook levels {sorted(found)} skip level {gaps[0]}"
        )
    for level in range(len(found)):
        book = found[level]
        if book.ndim != 2 or book.shape[0] < 1 or book.shape[1] != width:
            raise CheckpointError(
                source,
                f"'{template.format(level)}' has shape {list(book.shape)}, expected [K, {width}] since the "
                f"encoder outputs {width}; the state dict has inconsistent shapes",
            )
    return [found[level].astype(np.float32) for level in range(len(found))]


def _check_finite(weights: ModelWeights, source: str) -> None:
    for index, layer in enumerate(weights.layers):
        if not (np.isfinite(layer.weight).all() and np.isfinite(layer.bias).all()):
            raise CheckpointError(source, f"encoder layer {index} has NaN or Inf weights; the checkpoint is broken")
    for level, book in enumerate(weights.codebooks):
        if not np.isfinite(book).all():
            raise CheckpointError(source, f"codebook of level {level} has NaN or Inf entries")
