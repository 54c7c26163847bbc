"""The per-SID text caches give the same bytes as formatting every row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rqvae_ray.core.formatting import SidLines, SidParts, csv_lines, csv_parts, string_buffers, string_bytes
from rqvae_ray.core.sid_stats import pack_codes

SIZES = (5, 4, 6)
MANY = (40, 30, 20)  # 24,000 SIDs: the cache's buffers grow several times


def _vectors_of(books: list[np.ndarray]):
    def vectors(codes: np.ndarray) -> np.ndarray:
        total = np.zeros((len(codes), books[0].shape[1]), dtype=np.float32)
        for level, book in enumerate(books):
            total += book[codes[:, level]]
        return total

    return vectors


def _blocks(sizes: tuple[int, ...], block_rows: list[int], dim: int = 8):
    """The vectors of random codebooks, then (pids, codes, packed) per block."""
    rng = np.random.default_rng(7)
    books = [rng.standard_normal((size, dim)).astype(np.float32) for size in sizes]
    yield _vectors_of(books)
    pid = 1
    for rows in block_rows:
        codes = np.stack([rng.integers(0, size, rows) for size in sizes], axis=1).astype(np.int32)
        yield np.arange(pid, pid + rows, dtype=np.int64), codes, pack_codes(codes, sizes)
        pid += rows


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("max_entries", [1 << 16, 40])
def test_sid_parts_are_byte_identical_to_plain_formatting(tokens, max_entries):
    blocks = _blocks(SIZES, [0, 1, 37, 0, 200, 64, 500])
    vectors_of = next(blocks)
    text = SidParts(vectors_of, tokens, max_entries=max_entries)
    rows = 0
    for pids, codes, packed in blocks:
        rows += len(pids)
        cached = text.csv_parts(pids, codes, packed)
        plain = csv_parts(pids, codes, vectors_of(codes), tokens)
        assert cached.keys() == plain.keys()
        for name in plain:
            assert cached[name].to_pylist() == plain[name].to_pylist(), name
        assert string_bytes(csv_lines(cached)) == string_bytes(csv_lines(plain))
        assert len(text) <= max(max_entries, len(pids))
        assert (len(text) > 0) == (rows > 0)  # empty until the first row


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize(
    ("sizes", "max_entries", "max_bytes"), [(SIZES, 40, None), (MANY, 1 << 16, None), (MANY, 1 << 16, 1 << 18)]
)
def test_sid_lines_are_byte_identical_to_plain_formatting(tokens, sizes, max_entries, max_bytes):
    """Whole lines from the cache, as the cache grows, starts afresh when full (entries or bytes) and is reused."""
    blocks = _blocks(sizes, [0, 1, 37, 0, 200, 64, 500, 3000, 6000, 12000, 4096, 4096])
    vectors_of = next(blocks)
    text = SidLines(vectors_of, tokens, max_entries=max_entries)
    if max_bytes is not None:
        text.MAX_BYTES = max_bytes
    learnt, seen = [], []
    for pids, codes, packed in blocks:
        lines = text.csv_lines(pids, codes, packed)
        assert string_bytes(lines) == string_bytes(csv_lines(csv_parts(pids, codes, vectors_of(codes), tokens)))
        assert len(text) <= max(max_entries, len(pids))
        learnt.append(len(text))
        seen.append(packed)
    distinct = len(np.unique(np.concatenate(seen)))
    if max_entries >= distinct and max_bytes is None:  # never full: every SID learnt once, kept to the end
        assert learnt == sorted(learnt) and learnt[-1] == distinct
    else:
        assert learnt != sorted(learnt)  # it started afresh at least once


def test_string_buffers_are_the_bytes_without_a_copy():
    lines = pa.chunked_array([pa.array(["a,1\n", "bb,22\n"]), pa.array([], pa.string()), pa.array(["c\n", "dd\n"])[1:]])
    buffers = string_buffers(lines)
    assert b"".join(buffers) == b"a,1\nbb,22\ndd\n"
    assert all(isinstance(buffer, pa.Buffer) for buffer in buffers)
    assert string_buffers(pa.array([], pa.string())) == []
    with pytest.raises(TypeError):
        string_buffers(pa.array([1, 2]))
