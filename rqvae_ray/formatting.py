"""Output formatting: CSV lines and Arrow columns of ``Pid, Codebook, Vector``, built with pyarrow compute.

Floats are written as the shortest decimal that parses back to the identical float32 (Arrow's float32 to string
cast), and negative zero keeps its sign as ``-0.0``. Both list columns load with ``ast.literal_eval`` and
``json.loads``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CSV_HEADER = b"Pid,Codebook,Vector\n"


def _joined_lists(flat: pa.Array, width: int) -> pa.Array:
    """Join each run of ``width`` strings with ', '."""
    offsets = pa.array(np.arange(0, len(flat) + 1, width, dtype=np.int32))
    return pc.binary_join(pa.ListArray.from_arrays(offsets, flat), ", ")


def float_strings(values: np.ndarray) -> pa.Array:
    """Shortest round-trip decimal strings of float32 values."""
    text = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel()).cast(pa.string())
    return pc.if_else(pc.equal(text, "-0"), "-0.0", text)


def csv_lines(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray) -> pa.Array:
    """One complete CSV line (with newline) per row: ``Pid,"[c1, c2, c3]","[v1, ..., vd]"``."""
    if len(pids) == 0:
        return pa.array([], type=pa.string())
    pid_text = pa.array(pids.astype(np.int64)).cast(pa.string())
    code_text = _joined_lists(pa.array(codes.astype(np.int64).ravel()).cast(pa.string()), codes.shape[1])
    vector_text = _joined_lists(float_strings(vectors), vectors.shape[1])
    return pc.binary_join_element_wise(pid_text, ',"[', code_text, ']","[', vector_text, ']"\n', "")


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
