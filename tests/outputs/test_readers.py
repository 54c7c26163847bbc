"""Readers of codebooks files: CSV and Parquet written by the product's own formatting give the same values, bit for
bit, in bounded batches; wrong files fail with one error naming the path."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rqvae_ray.core.formatting import (
    CSV_HEADER,
    CSV_HEADER_WITH_SID,
    arrow_columns,
    csv_lines,
    csv_parts,
    sid_tokens,
    string_bytes,
    with_dedup_codes,
    with_dedup_tokens,
)
from rqvae_ray.core.sid_stats import SidCounter, pack_codes
from rqvae_ray.errors import CodebooksFileError
from rqvae_ray.outputs import readers
from rqvae_ray.outputs.readers import iter_codebooks, read_codebooks

REPO = Path(__file__).resolve().parents[2]
SIZES = (6, 6, 6)
DIM = 16


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pids 1..n, codes within SIZES (216 SIDs, so some POIs share one) and float32 vectors of any bit pattern
    (signed zeros, subnormals, extremes and infinities among them)."""
    rng = np.random.default_rng(seed)
    codes = np.stack([rng.integers(0, size, n) for size in SIZES], axis=1)
    vectors = rng.integers(0, 1 << 32, (n, DIM), dtype=np.uint64).astype(np.uint32).view(np.float32)
    vectors[~np.isfinite(vectors)] = 1.0
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 1.1754942e-38, 3.4028235e38, -np.inf, 0.1], dtype=np.float32)
    vectors.ravel()[: min(len(special), vectors.size)] = special[: vectors.size]
    return np.arange(1, n + 1, dtype=np.int64), codes, vectors


def write_codebooks(
    path: Path, pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray, *, dedup: bool = False, tokens: bool = False
) -> Path:
    """A codebooks file written as the product writes it (CSV or Parquet by the suffix)."""
    sizes = tuple(int(size) for size in codes.max(axis=0, initial=0) + 1)
    extra = None
    if dedup:
        counter = SidCounter(sizes)
        packed = pack_codes(codes, sizes)
        counter.add(packed)
        extra = counter.dedup_codes(packed)
    if path.suffix == ".csv":
        header = CSV_HEADER_WITH_SID if tokens else CSV_HEADER
        path.write_bytes(header + string_bytes(csv_lines(csv_parts(pids, codes, vectors, tokens), extra, len(sizes))))
        return path
    columns = arrow_columns(pids, codes, vectors)
    if extra is not None:
        columns["Codebook"] = with_dedup_codes(columns["Codebook"], extra)
    if tokens:
        text = sid_tokens(codes) if len(codes) else pa.array([], pa.string())
        columns["SID"] = text if extra is None else with_dedup_tokens(text, extra, len(sizes))
    pq.write_table(pa.table(columns), path, row_group_size=13)
    return path


def expected_codebooks(codes: np.ndarray, dedup: bool) -> list[list[int]]:
    """The Codebook lists, the dedup rule written plainly: shared SIDs get 0, 1, 2, ... in Pid order."""
    rows = [[int(code) for code in row] for row in codes]
    if not dedup:
        return rows
    counts = Counter(map(tuple, rows))
    seen: dict[tuple, int] = defaultdict(int)
    result = []
    for row in rows:
        key = tuple(row)
        if counts[key] > 1:
            result.append([*row, seen[key]])
            seen[key] += 1
        else:
            result.append(row)
    return result


def expected_tokens(codebooks: list[list[int]]) -> list[str]:
    return ["".join(f"<{'abcd'[level]}_{code}>" for level, code in enumerate(row)) for row in codebooks]


@pytest.mark.parametrize("tokens", [False, True], ids=["plain", "sid"])
@pytest.mark.parametrize("dedup", [False, True], ids=["no-dedup", "dedup"])
def test_csv_and_parquet_give_the_same_frame(tmp_path, dedup, tokens):
    pids, codes, vectors = synthetic(300)
    csv_path = write_codebooks(tmp_path / "c.csv", pids, codes, vectors, dedup=dedup, tokens=tokens)
    parquet_path = write_codebooks(tmp_path / "c.parquet", pids, codes, vectors, dedup=dedup, tokens=tokens)
    from_csv, from_parquet = read_codebooks(csv_path), read_codebooks(parquet_path)
    columns = ["Pid", "Codebook", "Vector"] + (["SID"] if tokens else [])
    want_codes = expected_codebooks(codes, dedup)
    assert dedup == any(len(row) == 4 for row in want_codes)
    for frame in (from_csv, from_parquet):
        assert list(frame.columns) == columns
        assert frame["Pid"].dtype == np.int64 and frame["Pid"].tolist() == pids.tolist()
        assert frame["Codebook"].tolist() == want_codes
        assert all(type(code) is int for row in frame["Codebook"] for code in row)
        for cell, row in zip(frame["Vector"], vectors, strict=True):
            assert cell.dtype == np.float32 and cell.shape == (DIM,)
            assert np.array_equal(cell.view(np.uint32), row.view(np.uint32))
        if tokens:
            assert frame["SID"].tolist() == expected_tokens(want_codes)
    for name in columns:
        for left, right in zip(from_csv[name], from_parquet[name], strict=True):
            if name == "Vector":
                assert left.tobytes() == right.tobytes()
            else:
                assert left == right


def test_published_csv_line(tmp_path):
    """The README's example line (floats as the product writes them, a dedup code, SID tokens) parses to its values."""
    path = tmp_path / "line.csv"
    path.write_bytes(
        b"Pid,Codebook,Vector,SID\n"
        b'1,"[5, 28, 25]","[-0.07441334, -0.2641578, 0.0, -0.0]",<a_5><b_28><c_25>\n'
        b'2,"[5, 28, 26, 1]","[1e-45, 3.4028235e+38, 2315.873, -7.80198e-18]",<a_5><b_28><c_26><d_1>\n'
    )
    frame = read_codebooks(path)
    assert frame["Pid"].tolist() == [1, 2]
    assert frame["Codebook"].tolist() == [[5, 28, 25], [5, 28, 26, 1]]
    assert frame["SID"].tolist() == ["<a_5><b_28><c_25>", "<a_5><b_28><c_26><d_1>"]
    want = np.array([[-0.07441334, -0.2641578, 0.0, -0.0], [1e-45, 3.4028235e38, 2315.873, -7.80198e-18]], np.float32)
    assert np.array_equal(np.stack(frame["Vector"]).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_iter_codebooks_gives_exact_batches_in_the_common_types(tmp_path, monkeypatch, suffix):
    # Small CSV blocks and Parquet row groups, so batches are joined and split across them.
    monkeypatch.setattr(readers, "CSV_BLOCK_BYTES", 1 << 12)
    pids, codes, vectors = synthetic(100, seed=3)
    path = write_codebooks(tmp_path / f"c{suffix}", pids, codes, vectors, dedup=True, tokens=True)
    batches = list(iter_codebooks(path, batch_rows=7))
    assert [batch.num_rows for batch in batches] == [7] * 14 + [2]
    schema = pa.schema(
        [
            ("Pid", pa.int64()),
            ("Codebook", pa.list_(pa.int32())),
            ("Vector", pa.list_(pa.float32(), DIM)),
            ("SID", pa.string()),
        ]
    )
    assert all(batch.schema.remove_metadata() == schema for batch in batches)
    table = pa.Table.from_batches(batches)
    assert table.column("Pid").to_pylist() == pids.tolist()
    assert table.column("Codebook").to_pylist() == expected_codebooks(codes, dedup=True)
    flat = table.column("Vector").combine_chunks().flatten().to_numpy()
    assert np.array_equal(flat.view(np.uint32), vectors.ravel().view(np.uint32))
    only = list(iter_codebooks(path, batch_rows=64, columns=["Pid", "Codebook"]))
    assert [batch.schema.names for batch in only] == [["Pid", "Codebook"]] * 2
    assert pa.Table.from_batches(only).column("Codebook").equals(table.column("Codebook"))
    with pytest.raises(CodebooksFileError, match="has no column 'Codes'"):
        iter_codebooks(path, columns=["Pid", "Codes"])
    with pytest.raises(ValueError, match="batch_rows must be at least 1"):
        iter_codebooks(path, batch_rows=0)


@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_without_rows(tmp_path, suffix, tokens):
    empty = np.zeros((0, len(SIZES)), dtype=np.int64)
    path = write_codebooks(
        tmp_path / f"e{suffix}", np.zeros(0, np.int64), empty, np.zeros((0, DIM), np.float32), tokens=tokens
    )
    assert list(iter_codebooks(path)) == []
    frame = read_codebooks(path)
    assert len(frame) == 0
    assert list(frame.columns) == ["Pid", "Codebook", "Vector"] + (["SID"] if tokens else [])
    assert frame["Pid"].dtype == np.int64


def _broken_files(tmp_path: Path) -> dict[str, Path]:
    pids, codes, vectors = synthetic(20)
    good = write_codebooks(tmp_path / "good.csv", pids, codes, vectors).read_bytes()
    lines = good.splitlines(keepends=True)
    files = {
        "missing": tmp_path / "missing.csv",
        "zero bytes": tmp_path / "zero.csv",
        "other header": tmp_path / "header.csv",
        "codes not integers": tmp_path / "codes.csv",
        "unbracketed list": tmp_path / "bracket.csv",
        "ragged vectors": tmp_path / "ragged.csv",
        "empty Pid": tmp_path / "pid.csv",
        "truncated parquet": tmp_path / "cut.parquet",
        "parquet of other columns": tmp_path / "other.parquet",
    }
    files["zero bytes"].write_bytes(b"")
    files["other header"].write_bytes(b"Pid,Codes,Vector\n" + b"".join(lines[1:]))
    files["codes not integers"].write_bytes(good.replace(b'"[', b'"[x', 1))
    files["unbracketed list"].write_bytes(lines[0] + lines[1].replace(b'"[', b'"', 1) + b"".join(lines[2:]))
    wider = [line.replace(b']"\n', b', 1.0]"\n') for line in lines]
    files["ragged vectors"].write_bytes(b"".join(lines[:2] + wider[2:3] + lines[3:]))
    files["empty Pid"].write_bytes(lines[0] + b"," + lines[1].split(b",", 1)[1])
    write_codebooks(tmp_path / "whole.parquet", pids, codes, vectors)
    files["truncated parquet"].write_bytes((tmp_path / "whole.parquet").read_bytes()[:300])
    pq.write_table(pa.table({"Pid": pids, "SID": pa.array(["x"] * len(pids))}), files["parquet of other columns"])
    return files


# What each broken file's error says after its path.
REASONS = {
    "missing": "no such file",
    "zero bytes": "is empty",
    "other header": "has columns Pid,Codes,Vector;",
    "codes not integers": "has a Codebook in rows 1-20 that is not a list of integers",
    "unbracketed list": "row 1 has a Codebook that is not a [...] list",
    "ragged vectors": f"row 2 has a Vector of {DIM + 1} floats, row 1 of {DIM}",
    "empty Pid": "row 1 has an empty Pid",
    "truncated parquet": "is not a readable Parquet file",
    "parquet of other columns": "has columns Pid,SID;",
}


def test_wrong_files_are_one_error_naming_the_path(tmp_path):
    files = _broken_files(tmp_path)
    assert files.keys() == REASONS.keys()
    for name, path in files.items():
        with pytest.raises(CodebooksFileError) as caught:
            read_codebooks(path)
        error = caught.value
        assert error.path == str(path), name
        message = str(error)
        assert message.startswith(f"{path}: {REASONS[name]}") and "\n" not in message, (name, message)


def test_vectors_keep_one_width_across_batches(tmp_path):
    """A Parquet Vector stored as a variable list (as pandas writes it) is read as fixed-size; a width that changes
    from one batch to the next is refused."""
    pids, _, vectors = synthetic(10)
    codebook = pa.array([[1, 2, 3]] * 10, pa.list_(pa.int32()))
    same = pa.array([row.tolist() for row in vectors], pa.list_(pa.float32()))
    pq.write_table(pa.table({"Pid": pids, "Codebook": codebook, "Vector": same}), tmp_path / "same.parquet")
    batches = list(iter_codebooks(tmp_path / "same.parquet", batch_rows=5))
    assert [batch.schema.field("Vector").type for batch in batches] == [pa.list_(pa.float32(), DIM)] * 2
    wider = pa.array([row.tolist() + [1.0] * (i >= 5) for i, row in enumerate(vectors)], pa.list_(pa.float32()))
    pq.write_table(pa.table({"Pid": pids, "Codebook": codebook, "Vector": wider}), tmp_path / "wider.parquet")
    with pytest.raises(CodebooksFileError, match=f"row 6 has a Vector of {DIM + 1} floats, the rows before {DIM}"):
        list(iter_codebooks(tmp_path / "wider.parquet", batch_rows=5))


def test_codebooks_file_error_survives_pickling():
    again = pickle.loads(pickle.dumps(CodebooksFileError("/x.csv", "no such file")))
    assert type(again) is CodebooksFileError and (again.path, again.reason) == ("/x.csv", "no such file")
    assert str(again) == "/x.csv: no such file"


def test_package_import_stays_light_and_exports_read_codebooks():
    code = (
        "import sys, rqvae_ray; "
        "assert not {'pandas', 'pyarrow'} & set(sys.modules), sorted({'pandas', 'pyarrow'} & set(sys.modules)); "
        "from rqvae_ray.outputs.readers import read_codebooks; "
        "assert rqvae_ray.read_codebooks is read_codebooks and 'read_codebooks' in rqvae_ray.__all__"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
