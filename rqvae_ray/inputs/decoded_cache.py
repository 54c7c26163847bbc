"""Decoded inputs kept between runs: a run on inputs seen before reads numpy arrays instead of importing torch to
decode ``.pt`` files (torch's import alone is 1.3-2 CPU-seconds here, most of a small job).

An entry is what a run made of one ``.pt`` file once every check passed: a checkpoint's frozen model
(:class:`~rqvae_ray.core.checkpoint.ModelWeights`, BatchNorm folded) or a ``poi_features.pt``'s sparse rows. Its name
holds the sha256 of the file's bytes and a digest of the modules that decode such files, so an entry serves only the
same bytes decoded by the same code. It is an uncompressed ``.npz`` read with ``allow_pickle=False`` (nothing is
ever unpickled from the cache), each array's CRC-32 checked as it is read; it is written under a temporary name and
renamed into place, so a reader never sees half an entry. A missing, unreadable or malformed entry is decoded again,
and a cache that cannot be written is skipped. At most :data:`CACHE_BYTES` are kept, the least recently used
removed first. Parquet datasets are read as they are and never cached.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import time
import zipfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

import rqvae_ray
from rqvae_ray.core.checkpoint import Layer, ModelWeights, load_checkpoint_bytes
from rqvae_ray.core.encoder import SparseRows

DEFAULT_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rqvae_ray" / "inputs"
CACHE_BYTES = 2 << 30
# The modules whose code decides what an entry holds (relative to the package).
DECODERS = ("core/checkpoint.py", "core/encoder.py", "inputs/features.py", "inputs/decoded_cache.py")
# A temporary file this old was left by a process that died while writing it.
STALE_TEMPORARY_S = 3600.0


class Kind(str, Enum):
    """What an entry was decoded from."""

    CHECKPOINT = "checkpoint"
    FEATURES = "features"


@dataclass(frozen=True)
class DecodedFeatures:
    """A ``poi_features.pt`` as the run uses it: its rows in CSR form and its number of columns."""

    rows: SparseRows
    dim: int


@functools.cache
def decoders_digest() -> str:
    """The sha256 of the decoding modules' source, the code half of every entry's name."""
    digest = hashlib.sha256()
    package = Path(rqvae_ray.__file__).parent
    for name in DECODERS:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class DecodedCache:
    """The entries in ``folder``, at most ``budget_bytes`` of them."""

    folder: Path = DEFAULT_DIR
    budget_bytes: int = CACHE_BYTES

    def weights(self, data: bytes, source: str = "checkpoint") -> ModelWeights:
        """The frozen model of a checkpoint's bytes: the cached one, else decoded
        (:func:`~rqvae_ray.core.checkpoint.load_checkpoint_bytes`, whose errors it raises) and kept."""
        sha256 = hashlib.sha256(data).hexdigest()
        arrays = self._read(Kind.CHECKPOINT, sha256)
        weights = None if arrays is None else _weights_from(arrays, sha256)
        if weights is None:
            weights = load_checkpoint_bytes(data, source=source, sha256=sha256)
            self._write(Kind.CHECKPOINT, sha256, _weights_arrays(weights))
        return weights

    def features(self, sha256: str) -> DecodedFeatures | None:
        """The decoded features of the ``.pt`` file with this sha256, or ``None`` when not cached."""
        arrays = self._read(Kind.FEATURES, sha256)
        return None if arrays is None else _features_from(arrays)

    def keep_features(self, sha256: str, features: DecodedFeatures) -> None:
        """Keep the checked, decoded features of the ``.pt`` file with this sha256."""
        rows = features.rows
        arrays = {"indptr": rows.indptr, "indices": rows.indices, "dim": np.array(features.dim, dtype=np.int64)}
        if rows.values is not None:
            arrays["values"] = rows.values
        self._write(Kind.FEATURES, sha256, arrays)

    def path(self, kind: Kind, sha256: str) -> Path:
        """Where the entry of this file and of this code is (OSError when the code's source cannot be read)."""
        return self.folder / f"{kind.value}-{sha256}-{decoders_digest()[:16]}.npz"

    def _read(self, kind: Kind, sha256: str) -> dict[str, np.ndarray] | None:
        try:
            path = self.path(kind, sha256)
        except OSError:  # the decoding modules' source is not installed: no entry can be matched to the code
            return None
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # damaged: decoded again and replaced
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):  # another user's entry, read-only: still used
            os.utime(path)  # recently used: the last to be removed
        return arrays

    def _write(self, kind: Kind, sha256: str, arrays: dict[str, np.ndarray]) -> None:
        if sum(array.nbytes for array in arrays.values()) > self.budget_bytes:
            return  # it would be the first to go
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = tempfile.NamedTemporaryFile(dir=self.folder, prefix=".", suffix=".tmp", delete=False)
            try:
                with handle:
                    np.savez(handle, **arrays)
                os.replace(handle.name, self.path(kind, sha256))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(handle.name)
                raise
            self._evict()
        except OSError:
            return  # a read-only or full disk: the run goes on without keeping this entry

    def _evict(self) -> None:
        """Remove the least recently used entries beyond the budget, and temporary files left by dead writers."""
        entries = []
        for path in self.folder.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another run removed it meanwhile
                stat = path.stat()
                if path.suffix == ".npz":
                    entries.append((stat.st_mtime, stat.st_size, path))
                elif path.suffix == ".tmp" and stat.st_mtime < time.time() - STALE_TEMPORARY_S:
                    path.unlink()
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.budget_bytes:
                break
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            total -= size


def _weights_arrays(weights: ModelWeights) -> dict[str, np.ndarray]:
    arrays = {
        "relu": np.array([layer.relu for layer in weights.layers], dtype=bool),
        "layout": np.array(weights.layout),
        "sinkhorn": np.array(weights.sinkhorn, dtype=np.float64).reshape(-1, 2),
    }
    for number, layer in enumerate(weights.layers):
        arrays[f"weight{number}"], arrays[f"bias{number}"] = layer.weight, layer.bias
    for level, codebook in enumerate(weights.codebooks):
        arrays[f"codebook{level}"] = codebook
    return arrays


def _weights_from(arrays: dict[str, np.ndarray], sha256: str) -> ModelWeights | None:
    """The model an entry holds, or ``None`` when the entry does not hold a well-formed one."""
    try:
        relu, sinkhorn = arrays["relu"], arrays["sinkhorn"]
        layers = tuple(
            Layer(arrays[f"weight{n}"], arrays[f"bias{n}"], bool(flag)) for n, flag in enumerate(relu.tolist())
        )
        levels = sum(1 for name in arrays if name.startswith("codebook"))
        codebooks = tuple(arrays[f"codebook{level}"] for level in range(levels))
        layout = str(arrays["layout"])
    except (KeyError, TypeError, ValueError):
        return None
    width = layers[0].weight.shape[1] if layers and layers[0].weight.ndim == 2 else None
    for layer in layers:
        shape_ok = layer.weight.ndim == 2 and layer.bias.shape == (layer.weight.shape[0],)
        if not shape_ok or layer.weight.shape[1] != width or layer.weight.dtype != np.float64:
            return None
        width = layer.weight.shape[0]
    if not layers or not codebooks or sinkhorn.ndim != 2 or sinkhorn.shape[1] != 2:
        return None
    if any(c.ndim != 2 or c.shape[1] != width or c.dtype != np.float32 for c in codebooks):
        return None
    pairs = tuple((int(level), float(epsilon)) for level, epsilon in sinkhorn.tolist())
    return ModelWeights(layers=layers, codebooks=codebooks, layout=layout, sha256=sha256, sinkhorn=pairs)


def _features_from(arrays: dict[str, np.ndarray]) -> DecodedFeatures | None:
    """The features an entry holds, or ``None`` when the entry does not hold well-formed CSR rows."""
    indptr, indices, values = arrays.get("indptr"), arrays.get("indices"), arrays.get("values")
    dim = arrays.get("dim")
    if indptr is None or indices is None or dim is None or dim.shape != () or indptr.ndim != 1 or len(indptr) < 2:
        return None
    if indptr.dtype != np.int64 or indices.dtype != np.int64 or indices.ndim != 1 or int(dim) < 1:
        return None
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        return None
    if len(indices) and (indices.min() < 0 or indices.max() >= int(dim)):
        return None
    if values is not None and (values.shape != indices.shape or values.dtype.kind != "f"):
        return None
    return DecodedFeatures(SparseRows(indptr, indices, values), int(dim))
