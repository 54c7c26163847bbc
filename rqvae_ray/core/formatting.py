"""Output formatting: CSV lines and Arrow columns of ``Pid, Codebook, Vector``, built with pyarrow compute.

Floats are written as the shortest decimal that parses back to the identical float32 (Arrow's float32 to string
cast), and negative zero keeps its sign as ``-0.0``. Both list columns load with ``ast.literal_eval`` and
``json.loads``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CSV_HEADER = b"Pid,Codebook,Vector\n"
CSV_HEADER_WITH_SID = b"Pid,Codebook,Vector,SID\n"
TOKEN_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def joined_rows(values: np.ndarray, strings: Callable[[np.ndarray], pa.Array], separator: str = ", ") -> pa.Array:
    """Each row of the 2-D array ``values`` as its ``strings`` (:func:`int_strings`, :func:`float_strings`) joined
    with ``separator``; rows of no values give ``""``."""
    flat = strings(values.ravel())
    offsets = pa.array(np.arange(len(values) + 1, dtype=np.int32) * values.shape[1])
    return pc.binary_join(pa.ListArray.from_arrays(offsets, flat), separator)


def float_strings(values: np.ndarray) -> pa.Array:
    """Shortest round-trip decimal strings of float32 values."""
    text = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel()).cast(pa.string())
    return pc.if_else(pc.equal(text, "-0"), "-0.0", text)


def int_strings(values: np.ndarray) -> pa.Array:
    """Decimal strings of integers."""
    return pa.array(np.ascontiguousarray(values, dtype=np.int64).ravel()).cast(pa.string())


def sid_tokens(codes: np.ndarray) -> pa.Array:
    """The downstream LLM token string of each SID: ``<a_12><b_3><c_7>`` (one letter per level)."""
    parts = []
    for level in range(codes.shape[1]):
        parts += [f"<{TOKEN_LETTERS[level]}_", int_strings(codes[:, level]), ">"]
    return pc.binary_join_element_wise(*parts, "")


def index_json_entries(pids: np.ndarray, codes: np.ndarray) -> pa.Array:
    """The ``"<Pid>": ["<a_5>", "<b_28>", "<c_25>"]`` entry of each row of an item-to-token JSON map; ``codes`` is
    ``[n, levels]``, a code below 0 (a POI without a dedup code) has no token."""
    present = codes >= 0
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(present.sum(axis=1), out=offsets[1:])
    levels = np.broadcast_to(np.arange(codes.shape[1]), codes.shape)[present]
    opening = pa.array([f'"<{TOKEN_LETTERS[level]}_' for level in range(codes.shape[1])]).take(pa.array(levels))
    tokens = pc.binary_join_element_wise(opening, int_strings(codes[present]), '>"', "")
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), tokens), ", ")
    return pc.binary_join_element_wise('"', int_strings(pids), '": [', joined, "]", "")


def csv_parts(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray, tokens: bool) -> dict[str, pa.Array]:
    """The pieces of each CSV line around the place where a dedup code may go.

    ``head`` is ``Pid,"[c1, c2, c3``, ``tail`` is ``]","[v1, ..., vd]"`` and ``tokens`` (when asked) is
    ``,<a_..><b_..><c_..>``; a line is ``head + tail + tokens + newline``.
    """
    parts = {"head": _head(pids, _codes_text(codes)), "tail": _tail(vectors)}
    if tokens:
        parts["tokens"] = _tokens_field(codes)
    return parts


def _codes_text(codes: np.ndarray) -> pa.Array:
    return joined_rows(codes, int_strings)


def _head(pids: np.ndarray, codes_text: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(int_strings(pids), ',"[', codes_text, "")


def _tail(vectors: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(']","[', joined_rows(vectors, float_strings), ']"', "")


def _tokens_field(codes: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(",", sid_tokens(codes), "")


class SidText:
    """The text of the parts of a CSV line that depend on the SID alone, formatted once per distinct SID.

    A POI's Codebook, Vector (the sum of its codewords) and SID tokens are functions of its codes, and far fewer
    SIDs exist than POIs (at most 32**3 for NYC), so each distinct SID is formatted once and later batches only look
    it up. The result is byte-identical to :func:`csv_parts`. Memory is bounded: the cache starts afresh whenever it
    would pass ``max_entries`` SIDs.
    """

    def __init__(self, vectors_of: Callable[[np.ndarray], np.ndarray], tokens: bool, max_entries: int = 1 << 16):
        self._vectors_of = vectors_of
        self.tokens = tokens
        self.max_entries = max_entries
        # Known packed SIDs in ascending order, and the row of each in the text columns. Lookups are a vectorized
        # search and an Arrow take, so the per-row cost stays out of Python.
        self._keys = np.empty(0, dtype=np.int64)
        self._rows = np.empty(0, dtype=np.int64)
        self._columns = self._no_columns()

    def __len__(self) -> int:
        return len(self._keys)

    def _no_columns(self) -> list[pa.Array]:
        """Empty text columns: codes, tail[, tokens]."""
        return [pa.array([], type=pa.string())] * (3 if self.tokens else 2)

    def csv_parts(self, pids: np.ndarray, codes: np.ndarray, packed: np.ndarray) -> dict[str, pa.Array]:
        """The same pieces as :func:`csv_parts`; ``packed`` is one int64 per row that identifies its SID."""
        self._learn(codes, packed)
        rows = pa.array(self._rows[np.searchsorted(self._keys, packed)])
        codes_text, tail, *tokens = (column.take(rows) for column in self._columns)
        parts = {"head": _head(pids, codes_text), "tail": tail}
        if self.tokens:
            parts["tokens"] = tokens[0]
        return parts

    def _learn(self, codes: np.ndarray, packed: np.ndarray) -> None:
        unique, first = np.unique(packed, return_index=True)
        new = ~np.isin(unique, self._keys, assume_unique=True)
        if not new.any():
            return
        if len(self._keys) + int(new.sum()) > self.max_entries:
            self._keys, self._rows, self._columns = self._keys[:0], self._rows[:0], self._no_columns()
            new[:] = True
        fresh = codes[first[new]]
        columns = [_codes_text(fresh), _tail(self._vectors_of(fresh))]
        if self.tokens:
            columns.append(_tokens_field(fresh))
        start = len(self._keys)
        keys = np.concatenate([self._keys, unique[new]])
        rows = np.concatenate([self._rows, np.arange(start, start + len(fresh), dtype=np.int64)])
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows = keys[order], rows[order]
        self._columns = [pa.concat_arrays([old, added]) for old, added in zip(self._columns, columns, strict=True)]


def csv_lines(parts: dict[str, pa.Array], extra: np.ndarray | None = None, levels: int = 0) -> pa.Array:
    """Complete CSV lines from :func:`csv_parts`; ``extra`` (>= 0 where a POI shares its SID) adds the dedup code
    to the Codebook list and a ``<x_k>`` token after the ``levels`` SID tokens."""
    if len(parts["head"]) == 0:
        return pa.array([], type=pa.string())
    pieces = [parts["head"]]
    shared = None
    if extra is not None:
        shared = pa.array(extra >= 0)
        pieces.append(pc.if_else(shared, pc.binary_join_element_wise(", ", int_strings(extra), ""), ""))
    pieces.append(parts["tail"])
    if "tokens" in parts:
        pieces.append(parts["tokens"])
        if shared is not None:
            token = pc.binary_join_element_wise(f"<{TOKEN_LETTERS[levels]}_", int_strings(extra), ">", "")
            pieces.append(pc.if_else(shared, token, ""))
    pieces.append("\n")
    return pc.binary_join_element_wise(*pieces, "")


def string_bytes(array: pa.Array | pa.ChunkedArray) -> bytes:
    """The concatenated bytes of a string array (its values buffer, without copying per row)."""
    if isinstance(array, pa.ChunkedArray):
        return b"".join(string_bytes(chunk) for chunk in array.chunks)
    if len(array) == 0:
        return b""
    if array.type == pa.large_string():
        offset_type = np.int64
    elif array.type == pa.string():
        offset_type = np.int32
    else:
        raise TypeError(f"expected a string array, got {array.type}")
    _, offsets_buf, data_buf = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=offset_type)[array.offset : array.offset + len(array) + 1]
    return data_buf[int(offsets[0]) : int(offsets[-1])].to_pybytes()


def arrow_columns(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray) -> dict[str, pa.Array]:
    """``Pid`` int64, ``Codebook`` list<int32>, ``Vector`` fixed_size_list<float32>[d] columns."""
    levels, dim = codes.shape[1], vectors.shape[1]
    offsets = pa.array(np.arange(0, len(pids) * levels + 1, levels, dtype=np.int32))
    return {
        "Pid": pa.array(pids.astype(np.int64)),
        "Codebook": pa.ListArray.from_arrays(offsets, pa.array(codes.astype(np.int32).ravel())),
        "Vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), dim),
    }


def with_dedup_codes(codebook: pa.Array, extra: np.ndarray) -> pa.Array:
    """``Codebook`` lists with the dedup code appended where ``extra`` >= 0."""
    codebook = codebook.combine_chunks() if isinstance(codebook, pa.ChunkedArray) else codebook
    levels = len(codebook.flatten()) // max(len(codebook), 1)
    codes = codebook.flatten().to_numpy().reshape(len(codebook), levels)
    shared = extra >= 0
    lengths = levels + shared.astype(np.int32)
    offsets = np.zeros(len(codes) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(offsets[-1], dtype=np.int32)
    starts = offsets[:-1]
    for level in range(levels):
        values[starts + level] = codes[:, level]
    values[starts[shared] + levels] = extra[shared]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def with_dedup_tokens(tokens: pa.Array, extra: np.ndarray, levels: int) -> pa.Array:
    """SID token strings with ``<x_k>`` appended where ``extra`` >= 0."""
    token = pc.binary_join_element_wise(f"<{TOKEN_LETTERS[levels]}_", int_strings(extra), ">", "")
    return pc.binary_join_element_wise(tokens, pc.if_else(pa.array(extra >= 0), token, ""), "")
