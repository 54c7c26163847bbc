"""The per-SID text cache gives the same bytes as formatting every row."""

from __future__ import annotations

import numpy as np
import pytest

from rqvae_ray.core.formatting import SidText, csv_lines, csv_parts, string_bytes
from rqvae_ray.core.sid_stats import pack_codes

SIZES = (5, 4, 6)


def _vectors_of(books: list[np.ndarray]):
    def vectors(codes: np.ndarray) -> np.ndarray:
        total = np.zeros((len(codes), books[0].shape[1]), dtype=np.float32)
        for level, book in enumerate(books):
            total += book[codes[:, level]]
        return total

    return vectors


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("max_entries", [1 << 16, 40])
def test_sid_text_is_byte_identical_to_plain_formatting(tokens, max_entries):
    rng = np.random.default_rng(7)
    books = [rng.standard_normal((size, 8)).astype(np.float32) for size in SIZES]
    vectors_of = _vectors_of(books)
    text = SidText(vectors_of, tokens, max_entries=max_entries)
    pid = 1
    for rows in [0, 1, 37, 0, 200, 64, 500]:
        codes = np.stack([rng.integers(0, size, rows) for size in SIZES], axis=1).astype(np.int32)
        pids = np.arange(pid, pid + rows, dtype=np.int64)
        pid += rows
        cached = text.csv_parts(pids, codes, pack_codes(codes, SIZES))
        plain = csv_parts(pids, codes, vectors_of(codes), tokens)
        assert cached.keys() == plain.keys()
        for name in plain:
            assert cached[name].to_pylist() == plain[name].to_pylist(), name
        assert string_bytes(csv_lines(cached)) == string_bytes(csv_lines(plain))
        assert len(text) <= max(max_entries, rows)
        assert (len(text) > 0) == (pid > 1)  # empty until the first row
