"""Loading ``poi_features.pt`` without holding the dense tensor in memory: a zip archive is memory-mapped and its
sparse rows are built a chunk of rows at a time, to the same rows as a plain load; a legacy file still loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rqvae_ray.core.encoder import SparseRows
from rqvae_ray.inputs.demo import write_dataset
from rqvae_ray.inputs.features import load_dense_features, load_features
from rqvae_ray.inputs.stores import FEATURES_FILE, LocalHub

REPO = "org/nyc"
N, DIM = 300, 17


def _features(weighted: bool) -> np.ndarray:
    rng = np.random.default_rng(7)
    dense = (rng.random((N, DIM)) < 0.2).astype(np.float32)
    dense[::7] = 0.0  # rows without features
    if weighted:
        dense *= rng.random((N, DIM)).astype(np.float32) + 0.5
    return dense


def _reference(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of ``dense`` the direct way: indptr, indices, values."""
    rows, cols = np.nonzero(dense)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(dense)))])
    return indptr, cols, dense[rows, cols]


def _hub(root: Path, dense: np.ndarray, legacy: bool = False) -> Path:
    mapping = [(f"p{pid}", pid) for pid in range(1, N + 1)]
    write_dataset(root, REPO, dense, {"total_dim": DIM, "num_pois": len(dense)}, mapping)
    if legacy:
        path = root / "datasets" / REPO / FEATURES_FILE
        torch.save(torch.from_numpy(dense), path, _use_new_zipfile_serialization=False)
    return root


def _recording_load(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the keyword arguments of every ``torch.load`` call, which still loads."""
    calls: list[dict] = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    return calls


@pytest.mark.parametrize("weighted", [False, True], ids=["multi-hot", "weighted"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_loaded_rows_are_those_of_a_plain_load(tmp_path, monkeypatch, weighted, legacy):
    dense = _features(weighted)
    hub = _hub(tmp_path, dense, legacy)
    calls = _recording_load(monkeypatch)
    rows = load_features(LocalHub(hub).dataset_files(*REPO.split("/"))).rows
    assert [call.get("mmap", False) for call in calls] == [not legacy]  # only a zip archive can be mapped
    assert all(call["weights_only"] for call in calls)
    plain = torch.load(hub / "datasets" / REPO / FEATURES_FILE, weights_only=True).numpy()
    indptr, indices, values = _reference(plain)
    np.testing.assert_array_equal(rows.indptr, indptr)
    np.testing.assert_array_equal(rows.indices, indices)
    if weighted:
        assert rows.values is not None and rows.values.dtype == np.float32
        np.testing.assert_array_equal(rows.values, values)
    else:
        assert rows.values is None


def test_float32_features_are_the_mapped_pages_not_a_copy(tmp_path):
    dense = _features(weighted=True)
    path = _hub(tmp_path, dense) / "datasets" / REPO / FEATURES_FILE
    loaded = load_dense_features(path, REPO)
    assert loaded.dtype == np.float32
    assert any(start <= loaded.ctypes.data < end for start, end in _mappings_of(path)), "not the file's mapped pages"
    np.testing.assert_array_equal(loaded, dense)


def _mappings_of(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process that map ``path``."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc")
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_other_dtypes_still_convert_to_float32(tmp_path):
    path = tmp_path / "features.pt"
    torch.save(torch.from_numpy(_features(weighted=True).astype(np.float64)), path)
    loaded = load_dense_features(path, REPO)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, _features(weighted=True))


@pytest.mark.parametrize("chunk_elements", [1, DIM, 5 * DIM + 3, 1 << 24])
def test_sparse_rows_in_chunks_are_those_of_all_rows_at_once(chunk_elements):
    dense = _features(weighted=True)
    rows = SparseRows.from_dense(dense, chunk_elements=chunk_elements)
    indptr, indices, values = _reference(dense)
    np.testing.assert_array_equal(rows.indptr, indptr)
    np.testing.assert_array_equal(rows.indices, indices)
    np.testing.assert_array_equal(rows.values, values)
    assert rows.indices.dtype == np.int64 and rows.indptr.dtype == np.int64


def test_sparse_rows_of_no_rows_and_no_features():
    empty = SparseRows.from_dense(np.zeros((0, DIM), dtype=np.float32))
    assert empty.num_rows == 0 and len(empty.indices) == 0
    blank = SparseRows.from_dense(np.zeros((4, DIM), dtype=np.float32), chunk_elements=DIM)
    np.testing.assert_array_equal(blank.indptr, np.zeros(5))
