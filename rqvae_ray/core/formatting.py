"""Output formatting: CSV lines and Arrow columns of ``Pid, Codebook, Vector``, built with pyarrow compute.

Floats are written as the shortest decimal that parses back to the identical float32 (Arrow's float32 to string
cast), and negative zero keeps its sign as ``-0.0``. Both list columns load with ``ast.literal_eval`` and
``json.loads``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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


class _GrowingStrings:
    """A string column that grows in place: appending copies the new values' bytes only (the buffers double when
    full), and earlier values never move, so arrays made from it before stay valid."""

    def __init__(self) -> None:
        self._data = np.empty(1 << 16, dtype=np.uint8)
        self._offsets = np.zeros(1 << 10, dtype=np.int32)
        self._len = 0

    @property
    def nbytes(self) -> int:
        return int(self._offsets[self._len])

    def append(self, values: pa.Array) -> None:
        offsets = _string_offsets(values)
        start, added = int(offsets[0]), int(offsets[-1] - offsets[0])
        end, count = self.nbytes, len(values)
        if end + added > len(self._data):
            self._data = _grown(self._data, end + added)
        if self._len + count + 1 > len(self._offsets):
            self._offsets = _grown(self._offsets, self._len + count + 1)
        if added:
            self._data[end : end + added] = np.frombuffer(values.buffers()[2], dtype=np.uint8)[start : start + added]
        self._offsets[self._len + 1 : self._len + count + 1] = offsets[1:] - start + end
        self._len += count

    def array(self) -> pa.Array:
        offsets = pa.py_buffer(self._offsets[: self._len + 1])
        return pa.StringArray.from_buffers(self._len, offsets, pa.py_buffer(self._data[: self.nbytes]))


def _grown(buffer: np.ndarray, needed: int) -> np.ndarray:
    """A copy of ``buffer`` with room for at least ``needed`` items (twice as many)."""
    grown = np.empty(max(needed, 2 * len(buffer)), dtype=buffer.dtype)
    grown[: len(buffer)] = buffer
    return grown


def _string_offsets(values: pa.Array) -> np.ndarray:
    """The ``len + 1`` offsets of a string array into its values buffer."""
    if len(values) == 0:
        return np.zeros(1, dtype=np.int64)
    if values.type == pa.large_string():
        offset_type = np.int64
    elif values.type == pa.string():
        offset_type = np.int32
    else:
        raise TypeError(f"expected a string array, got {values.type}")
    return np.frombuffer(values.buffers()[1], dtype=offset_type)[values.offset : values.offset + len(values) + 1]


def _text_bytes(values: pa.Array) -> int:
    """The bytes of a string array's values."""
    offsets = _string_offsets(values)
    return int(offsets[-1] - offsets[0])


class _SidColumns(ABC):
    """Text columns that depend on the SID alone, formatted once per distinct SID (:meth:`_format`).

    A POI's Codebook, Vector (the sum of its codewords) and SID tokens are functions of its codes, and far fewer
    SIDs exist than POIs (at most 32**3 for NYC), so each distinct SID is formatted once and later batches only look
    it up: a vectorized search and an Arrow take, so the per-row cost stays out of Python. Memory is bounded: the
    cache starts afresh whenever it would pass ``max_entries`` SIDs (or 1 GiB of text).
    """

    MAX_BYTES = 1 << 30

    def __init__(self, vectors_of: Callable[[np.ndarray], np.ndarray], tokens: bool, max_entries: int = 1 << 16):
        self._vectors_of = vectors_of
        self.tokens = tokens
        self.max_entries = max_entries
        self._forget()

    def __len__(self) -> int:
        return len(self._keys)

    @abstractmethod
    def _format(self, codes: np.ndarray) -> list[pa.Array]:
        """The cached columns of SIDs given by their codes."""

    def _pieces(self, codes: np.ndarray) -> list[pa.Array]:
        """The codes text, the tail and (when asked) the tokens field of SIDs given by their codes."""
        pieces = [_codes_text(codes), _tail(self._vectors_of(codes))]
        return pieces + [_tokens_field(codes)] if self.tokens else pieces

    def _forget(self) -> None:
        # Known packed SIDs in ascending order, and the row of each in the columns (in the order they were learnt).
        self._keys = np.empty(0, dtype=np.int64)
        self._rows = np.empty(0, dtype=np.int64)
        self._columns: list[_GrowingStrings] = []

    def _lookup(self, codes: np.ndarray, packed: np.ndarray) -> list[pa.Array]:
        """The cached columns of each row (``packed``: one int64 per row that identifies its SID)."""
        if not len(packed):
            return self._format(codes)
        found, places = self._find(packed)
        if not found.all():
            self._learn(codes, packed, found)
            found, places = self._find(packed)
        rows = pa.array(self._rows[places])
        return [column.array().take(rows) for column in self._columns]

    def _find(self, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which rows' SIDs are known, and the place of each row's SID among the keys (where it is known)."""
        if not len(self._keys):
            return np.zeros(len(packed), dtype=bool), np.zeros(len(packed), dtype=np.int64)
        places = np.minimum(np.searchsorted(self._keys, packed), len(self._keys) - 1)
        return self._keys[places] == packed, places

    def _learn(self, codes: np.ndarray, packed: np.ndarray, found: np.ndarray) -> None:
        unique, first = np.unique(packed[~found], return_index=True)
        columns = self._format(codes[np.flatnonzero(~found)[first]])
        added = sum(_text_bytes(column) for column in columns)
        full = len(self._keys) + len(unique) > self.max_entries
        if full or max((column.nbytes for column in self._columns), default=0) + added > self.MAX_BYTES:
            self._forget()
            if found.any():  # the block's other SIDs are forgotten too
                self._learn(codes, packed, np.zeros(len(packed), dtype=bool))
                return
        if not self._columns:
            self._columns = [_GrowingStrings() for _ in columns]
        start = len(self._keys)
        places = np.searchsorted(self._keys, unique)  # a merge: the keys stay sorted without sorting them again
        self._keys = np.insert(self._keys, places, unique)
        self._rows = np.insert(self._rows, places, np.arange(start, start + len(unique), dtype=np.int64))
        for column, values in zip(self._columns, columns, strict=True):
            column.append(values)


class SidParts(_SidColumns):
    """:func:`csv_parts` (the pieces around the place of a dedup code) through the per-SID cache: the same bytes."""

    def _format(self, codes: np.ndarray) -> list[pa.Array]:
        return self._pieces(codes)

    def csv_parts(self, pids: np.ndarray, codes: np.ndarray, packed: np.ndarray) -> dict[str, pa.Array]:
        """The same pieces as :func:`csv_parts`; ``packed`` is one int64 per row that identifies its SID."""
        codes_text, tail, *tokens = self._lookup(codes, packed)
        parts = {"head": _head(pids, codes_text), "tail": tail}
        if self.tokens:
            parts["tokens"] = tokens[0]
        return parts


class SidLines(_SidColumns):
    """Whole CSV lines through the per-SID cache: the same bytes as ``csv_lines(csv_parts(...))``, each line the
    Pid and the cached rest of it (one take and one join per batch)."""

    def _format(self, codes: np.ndarray) -> list[pa.Array]:
        return [pc.binary_join_element_wise('"[', *self._pieces(codes), "\n", "")]

    def csv_lines(self, pids: np.ndarray, codes: np.ndarray, packed: np.ndarray) -> pa.Array:
        """The complete lines of these rows; ``packed`` is one int64 per row that identifies its SID."""
        if not len(pids):
            return pa.array([], type=pa.string())
        (rest,) = self._lookup(codes, packed)
        return pc.binary_join_element_wise(int_strings(pids), rest, ",")


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
    """The concatenated bytes of a string array."""
    return b"".join(string_buffers(array))


def string_buffers(array: pa.Array | pa.ChunkedArray) -> list[pa.Buffer]:
    """The concatenated bytes of a string array as slices of its values buffers (one per chunk), not copied: a file
    or a hash takes them as they are."""
    if isinstance(array, pa.ChunkedArray):
        return [buffer for chunk in array.chunks for buffer in string_buffers(chunk)]
    offsets = _string_offsets(array)
    if offsets[-1] == offsets[0]:
        return []
    return [array.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))]


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
