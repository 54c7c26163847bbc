"""The SID diff, checked against a plain in-memory reference written here: whole-SID and first-level differences,
collisions, and POIs that moved between collision groups; streamed in small batches too; and the command line."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rqvae_ray.cli import diff as diff_module
from rqvae_ray.cli.diff import app, diff_codebooks
from rqvae_ray.core.formatting import arrow_columns
from rqvae_ray.errors import CodebooksMismatchError
from tests.outputs.test_readers import REPO, SIZES, expected_codebooks, synthetic, write_codebooks

SHOWN = 10


def reference(pids: list[int], a: list[list[int]], b: list[list[int]]) -> dict:
    """The diff's figures computed plainly, with every POI in memory."""
    levels = max((len(codes) for codes in a + b), default=0)
    first_differs = [0] * levels
    for codes_a, codes_b in zip(a, b, strict=True):
        padded_a, padded_b = (codes + [None] * (levels - len(codes)) for codes in (codes_a, codes_b))
        for level in range(levels):
            if padded_a[level] != padded_b[level]:
                first_differs[level] += 1
                break

    def side(lists: list[list[int]]) -> tuple[list[tuple], dict, dict]:
        base = min((len(codes) for codes in lists), default=0)
        sids = [tuple(codes[:base]) for codes in lists]
        members = defaultdict(set)
        for pid, sid in zip(pids, sids, strict=True):
            members[sid].add(pid)
        counts = Counter(sids)
        figures = {
            "sid_levels": base,
            "dedup_codes": sum(len(codes) > base for codes in lists),
            "unique_sids": len(counts),
            "collided_sids": sum(count > 1 for count in counts.values()),
            "pois_in_collisions": sum(count for count in counts.values() if count > 1),
        }
        return sids, members, figures

    sids_a, members_a, figures_a = side(a)
    sids_b, members_b, figures_b = side(b)
    moved = [
        pid for pid, sid_a, sid_b in zip(pids, sids_a, sids_b, strict=True) if members_a[sid_a] != members_b[sid_b]
    ]
    return {
        "pois": len(pids),
        "sid_differs": sum(first_differs),
        "first_differs_at_level": first_differs,
        "a": figures_a,
        "b": figures_b,
        "moved_pois": len(moved),
        "moved_pids": moved[:SHOWN],
    }


def figures(result) -> dict:
    """The diff's figures without the file paths."""
    found = result.to_dict()
    for name in ("a", "b"):
        found[name].pop("path")
    return found


@pytest.fixture(params=[diff_module.BATCH_ROWS, 7], ids=["one-batch", "batches-of-7"])
def batch_rows(request, monkeypatch):
    monkeypatch.setattr(diff_module, "BATCH_ROWS", request.param)
    return request.param


def test_a_file_with_itself(tmp_path, batch_rows):
    pids, codes, vectors = synthetic(400)
    path = write_codebooks(tmp_path / "a.csv", pids, codes, vectors)
    result = diff_codebooks(path, path)
    assert (result.pois, result.sid_differs, result.first_differs_at_level) == (400, 0, [0, 0, 0])
    assert (result.moved_pois, result.moved_pids) == (0, [])
    counts = Counter(map(tuple, codes.tolist()))
    for side in (result.a, result.b):
        assert side.path == str(path) and (side.sid_levels, side.dedup_codes) == (3, 0)
        assert side.unique_sids == len(counts)
        assert side.collided_sids == sum(count > 1 for count in counts.values()) > 0
        assert side.pois_in_collisions == sum(count for count in counts.values() if count > 1)


def _changed(codes: np.ndarray) -> np.ndarray:
    """A copy with SIDs changed in known places: first at level 1 (rows 5, 6), level 2 (row 17), level 3 (rows 40,
    41, 42), and rows 100-109 given the SID of row 1."""
    changed = codes.copy()
    for row, level in [(5, 0), (6, 0), (17, 1), (40, 2), (41, 2), (42, 2)]:
        changed[row - 1, level] = (changed[row - 1, level] + 1) % SIZES[level]
    changed[99:109] = codes[0]
    return changed


@pytest.mark.parametrize("suffixes", [(".csv", ".csv"), (".csv", ".parquet"), (".parquet", ".csv")])
def test_sids_changed_in_known_places(tmp_path, batch_rows, suffixes):
    pids, codes, vectors = synthetic(300, seed=1)
    changed = _changed(codes)
    a = write_codebooks(tmp_path / f"a{suffixes[0]}", pids, codes, vectors)
    b = write_codebooks(tmp_path / f"b{suffixes[1]}", pids, changed, vectors)
    result = diff_codebooks(a, b)
    rows_to_row_1 = int((codes[99:109] != codes[0]).any(axis=1).sum())
    assert result.sid_differs == 6 + rows_to_row_1
    first_at = np.argmax(codes[99:109] != codes[0], axis=1)[(codes[99:109] != codes[0]).any(axis=1)]
    want_levels = [2 + int((first_at == 0).sum()), 1 + int((first_at == 1).sum()), 3 + int((first_at == 2).sum())]
    assert result.first_differs_at_level == want_levels
    assert result.moved_pois > 0 and 1 in result.moved_pids  # row 1's group gained POIs
    assert figures(result) == reference(pids.tolist(), codes.tolist(), changed.tolist())


def test_random_changes_streamed_in_small_batches(tmp_path, batch_rows):
    """Many small collision groups, a third of the POIs changed at random levels."""
    rng = np.random.default_rng(5)
    pids, codes, vectors = synthetic(500, seed=2)
    codes = codes % 3  # 27 SIDs: every group is shared
    changed = codes.copy()
    rows = rng.choice(len(codes), 170, replace=False)
    changed[rows, rng.integers(0, 3, len(rows))] = rng.integers(0, 3, len(rows))
    a = write_codebooks(tmp_path / "a.parquet", pids, codes, vectors)
    b = write_codebooks(tmp_path / "b.csv", pids, changed, vectors, dedup=True)
    result = diff_codebooks(a, b)
    assert result.moved_pois > SHOWN
    assert figures(result) == reference(pids.tolist(), codes.tolist(), expected_codebooks(changed, dedup=True))


def test_a_group_whose_other_side_sids_fall_in_later_batches(tmp_path, batch_rows):
    """A's SID X (rows 1-7 and 12-14) holds [1, 1, 1] in B in the first batch of 7 and the lower [0, 0, 0] in the
    second, while [1, 1, 1] is held by as many POIs in B as X in A: only the lowest partner seen across batches
    shows that X's POIs moved."""
    x, y, z, low, high = [2, 2, 2], [3, 3, 3], [4, 4, 4], [0, 0, 0], [1, 1, 1]
    codes_a = np.array([x] * 7 + [y] * 4 + [x] * 3)
    codes_b = np.array([high] * 10 + [z] + [low] * 3)
    pids, _, vectors = synthetic(14)
    a = write_codebooks(tmp_path / "a.csv", pids, codes_a, vectors)
    b = write_codebooks(tmp_path / "b.csv", pids, codes_b, vectors)
    result = diff_codebooks(a, b)
    assert result.moved_pois == 14 and result.moved_pids == list(range(1, 11))
    assert figures(result) == reference(pids.tolist(), codes_a.tolist(), codes_b.tolist())


def test_csv_against_parquet_of_the_same_rows(tmp_path, batch_rows):
    pids, codes, vectors = synthetic(250, seed=4)
    a = write_codebooks(tmp_path / "a.csv", pids, codes, vectors, dedup=True, tokens=True)
    b = write_codebooks(tmp_path / "b.parquet", pids, codes, vectors, dedup=True, tokens=True)
    result = diff_codebooks(a, b)
    lists = expected_codebooks(codes, dedup=True)
    assert figures(result) == reference(pids.tolist(), lists, lists)
    assert result.sid_differs == 0 and result.first_differs_at_level == [0, 0, 0, 0]
    assert result.a.dedup_codes == result.a.pois_in_collisions > 0  # every shared SID got a dedup code
    assert figures(result)["a"] == figures(result)["b"]


def test_a_dedup_code_against_none(tmp_path, batch_rows):
    pids, codes, vectors = synthetic(250, seed=6)
    a = write_codebooks(tmp_path / "a.csv", pids, codes, vectors)
    b = write_codebooks(tmp_path / "b.parquet", pids, codes, vectors, dedup=True)
    result = diff_codebooks(a, b)
    shared = result.a.pois_in_collisions
    assert shared > 0
    assert result.sid_differs == shared and result.first_differs_at_level == [0, 0, 0, shared]
    assert (result.a.dedup_codes, result.b.dedup_codes, result.b.sid_levels) == (0, shared, 3)
    # Collisions are counted on the SID without its dedup code, so both sides agree and no POI moved.
    assert figures(result)["a"] | {"dedup_codes": shared} == figures(result)["b"]
    assert result.moved_pois == 0
    assert figures(result) == reference(pids.tolist(), codes.tolist(), expected_codebooks(codes, dedup=True))


def test_files_without_rows(tmp_path):
    empty = np.zeros((0, 3), dtype=np.int64)
    a = write_codebooks(tmp_path / "a.csv", np.zeros(0, np.int64), empty, np.zeros((0, 4), np.float32))
    b = write_codebooks(tmp_path / "b.parquet", np.zeros(0, np.int64), empty, np.zeros((0, 4), np.float32))
    assert figures(diff_codebooks(a, b)) == reference([], [], [])


def _mismatched(tmp_path: Path) -> dict[str, tuple[Path, Path, str]]:
    """Pairs of files that cannot be compared, and what the error says."""
    pids, codes, vectors = synthetic(60)
    good = write_codebooks(tmp_path / "good.csv", pids, codes, vectors)
    shorter = write_codebooks(tmp_path / "shorter.parquet", pids[:-1], codes[:-1], vectors[:-1])
    skipped = np.r_[pids[:29], pids[29:] + 1]  # no Pid 30, the rest shifted
    other = write_codebooks(tmp_path / "other.csv", skipped, codes, vectors)
    swapped = np.r_[pids[:10], pids[11], pids[10], pids[12:]]
    unordered = write_codebooks(tmp_path / "unordered.csv", swapped, codes, vectors)
    negative = codes.copy()
    negative[44, 1] = -1
    with_negative = write_codebooks(tmp_path / "negative.csv", pids, negative, vectors)
    ragged = pa.array([[1, 2, 3]] * 30 + [[1, 2, 3, 4, 5]] * 30, pa.list_(pa.int32()))
    columns = arrow_columns(pids, codes, vectors)
    pq.write_table(pa.table(columns | {"Codebook": ragged}), tmp_path / "ragged.parquet")
    missing = tmp_path / "missing.csv"
    return {
        "row counts": (
            good,
            shorter,
            f"{good} and {shorter} do not hold the same POIs: the first has 60 rows, the second 59",
        ),
        "a Pid differs": (good, other, "row 30 has Pid 30 in the first and Pid 31 in the second"),
        "not ascending": (good, unordered, f"{unordered}: row 12 has Pid 11 after Pid 12; the diff needs rows"),
        "missing": (missing, good, f"{missing}: no such file"),
        "negative code": (good, with_negative, f"{with_negative}: row 45 has a negative code"),
        "ragged Codebooks": (tmp_path / "ragged.parquet", good, "has Codebooks of 3 to 5 codes"),
    }


def test_files_of_other_pois_fail_with_one_line_and_exit_2(tmp_path, batch_rows):
    runner = CliRunner()
    for name, (a, b, reason) in _mismatched(tmp_path).items():
        result = runner.invoke(app, [str(a), str(b), "--json"])
        assert result.exit_code == 2, (name, result.output)
        assert result.stdout == "", name
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], (name, lines)


def test_json_is_the_only_stdout(tmp_path):
    pids, codes, vectors = synthetic(120, seed=8)
    a = write_codebooks(tmp_path / "a.csv", pids, codes, vectors)
    b = write_codebooks(tmp_path / "b.parquet", pids, _changed(codes), vectors, tokens=True)
    result = CliRunner().invoke(app, [str(a), str(b), "--json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stderr == ""
    parsed = json.loads(result.stdout)
    assert {"pois", "sid_differs", "first_differs_at_level"} <= parsed.keys()
    assert parsed == diff_codebooks(a, b).to_dict()
    assert parsed["pois"] == 120 and parsed["sid_differs"] > 0 and len(parsed["first_differs_at_level"]) == 3


def test_console_tables(tmp_path):
    pids, codes, vectors = synthetic(120, seed=8)
    a = write_codebooks(tmp_path / "a.csv", pids, codes, vectors)
    b = write_codebooks(tmp_path / "b.csv", pids, _changed(codes), vectors)
    expected = diff_codebooks(a, b)
    result = CliRunner().invoke(app, [str(a), str(b)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "SID diff" in result.stdout and "first differing level" in result.stdout
    for level, count in enumerate(expected.first_differs_at_level, start=1):
        assert re.search(rf"│ +{level} │ +{count} │", result.stdout), (level, count)
    assert f"whole SID differs: {expected.sid_differs} " in result.stdout
    moved = ", ".join(map(str, expected.moved_pids))
    assert f"moved between collision groups: {expected.moved_pois} (first Pids: {moved})" in result.stdout


def test_module_runs_as_a_command(tmp_path):
    pids, codes, vectors = synthetic(80, seed=9)
    a = write_codebooks(tmp_path / "a.parquet", pids, codes, vectors)
    b = write_codebooks(tmp_path / "b.csv", pids, _changed(codes), vectors)
    done = subprocess.run(
        [sys.executable, "-m", "rqvae_ray.diff", str(a), str(b), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == diff_codebooks(a, b).to_dict()


def test_mismatch_error_survives_pickling():
    error = CodebooksMismatchError("a.csv", "b.csv", "the first has 3 rows, the second 2")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CodebooksMismatchError and str(again) == str(error)
    assert (again.a, again.b, again.reason) == ("a.csv", "b.csv", "the first has 3 rows, the second 2")
