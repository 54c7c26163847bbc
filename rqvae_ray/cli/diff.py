"""``python -m rqvae_ray.diff A B [--json]``: how the SIDs of two codebooks files of the same POIs differ.

Both files (CSV or Parquet, any mix) are streamed together twice in Pid order, reading only ``Pid`` and
``Codebook``, and memory is bounded by the SID space, never by the number of POIs. The first pass checks the Pids,
compares the codes row by row and learns each file's SID length and code range; the second keeps per SID of A how
many POIs hold it, the SID in B of the first of them, whether they hold others in B and its first Pids, and per SID
of B its POI count. SIDs are packed as the writer packs them, in several int64 words when the code ranges multiply
past 2**63.

An SID here is a Codebook without the dedup code that ``--dedup`` appends: a file's SID length is its shortest
Codebook, and a list one code longer carries a dedup code. Collisions and collision groups use those SIDs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import typer
from rich.console import Console
from rich.table import Table

from rqvae_ray.cli.flags import HelpFlag, flag
from rqvae_ray.core.sid_stats import pack_codes, sid_layout
from rqvae_ray.errors import CodebooksFileError, CodebooksMismatchError, RqvaeRayError
from rqvae_ray.outputs.readers import iter_codebooks

BATCH_ROWS = 65536
MOVED_PIDS_SHOWN = 10
MISSING = -1  # the code a shorter Codebook lacks at a level; real codes are >= 0


@dataclass(frozen=True)
class SideStats:
    """SID figures of one file, on SIDs without their dedup code."""

    path: str
    sid_levels: int  # codes in an SID (the file's shortest Codebook)
    dedup_codes: int  # rows whose Codebook carries one more code, a dedup code
    unique_sids: int
    collided_sids: int  # SIDs held by 2+ POIs
    pois_in_collisions: int


@dataclass(frozen=True)
class SidDiff:
    """How the SIDs of two codebooks files of the same POIs differ."""

    pois: int
    sid_differs: int  # POIs whose whole Codebook (a dedup code included) differs
    first_differs_at_level: list[int]  # per level, the POIs whose Codebooks first differ there
    a: SideStats
    b: SideStats
    moved_pois: int  # POIs whose collision group in A is not the same set of POIs as in B
    moved_pids: list[int]  # the first of them (at most MOVED_PIDS_SHOWN), in Pid order

    def to_dict(self) -> dict:
        return asdict(self)


def diff_codebooks(a: str | Path, b: str | Path) -> SidDiff:
    """Compare the SIDs of two codebooks files of the same POIs, both in ascending Pid order."""
    a, b = str(a), str(b)
    first = _first_pass(a, b)
    layout_a, layout_b = (sid_layout(shape.sizes) for shape in first.shapes)
    in_a, in_b = _Groups(layout_a.dtype, layout_b.dtype), _SidCounts(layout_b.dtype)
    for batch_a, batch_b in _pairs(a, b):
        key_a, key_b = _sid_keys(batch_a, first.shapes[0]), _sid_keys(batch_b, first.shapes[1])
        in_a.add(key_a, key_b, batch_a.column("Pid").to_numpy())
        in_b.add(key_b)
    # A POI's group in A is the same set as in B exactly when every POI of its A group holds one and the same SID
    # in B and that SID is held by as many POIs in B: the A group then lies inside the B group, of the same size.
    partner_count = in_b.count[np.searchsorted(in_b.keys, in_a.partner)]
    moved = in_a.split | (partner_count != in_a.count)
    # A group's POIs all move or all stay, so the first moved Pids are among the first Pids of the moved groups.
    moved_pids = np.sort(in_a.first_pids[moved].ravel())
    return SidDiff(
        pois=first.rows,
        sid_differs=int(first.first_differs.sum()),
        first_differs_at_level=[int(count) for count in first.first_differs],
        a=_side_stats(a, first.shapes[0], in_a.count),
        b=_side_stats(b, first.shapes[1], in_b.count),
        moved_pois=int(in_a.count[moved].sum()),
        moved_pids=moved_pids[moved_pids >= 0][:MOVED_PIDS_SHOWN].tolist(),
    )


@dataclass(frozen=True)
class _Shape:
    """What the first pass learns of one file's Codebooks."""

    sid_levels: int
    dedup_codes: int
    sizes: tuple[int, ...]  # per SID level, the largest code + 1


@dataclass(frozen=True)
class _FirstPass:
    rows: int
    first_differs: np.ndarray  # POIs per level
    shapes: tuple[_Shape, _Shape]


def _first_pass(a: str, b: str) -> _FirstPass:
    """Check both files' Pids, count where their Codebooks first differ, and learn each file's SID shape."""
    first_differs = np.zeros(0, dtype=np.int64)
    per_length = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)]  # rows per Codebook length
    largest = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)]  # largest code per level
    rows = 0
    for batch_a, batch_b in _pairs(a, b):
        grids = []
        for side, (path, batch) in enumerate(((a, batch_a), (b, batch_b))):
            grid, lengths = _code_grid(path, batch.column("Codebook"), rows)
            per_length[side] = _added(per_length[side], np.bincount(lengths))
            largest[side] = _maxed(largest[side], grid.max(axis=0))
            grids.append(grid)
        width = max(grid.shape[1] for grid in grids)
        grid_a, grid_b = (np.pad(g, ((0, 0), (0, width - g.shape[1])), constant_values=MISSING) for g in grids)
        differs = grid_a != grid_b
        changed = differs.any(axis=1)
        first_differs = _added(first_differs, np.bincount(differs[changed].argmax(axis=1), minlength=width))
        rows += batch_a.num_rows
    levels = max(len(per_length[0]), len(per_length[1])) - 1
    first_differs = _added(first_differs, np.zeros(max(levels, 0), dtype=np.int64))
    shapes = tuple(_shape(path, per_length[side], largest[side]) for side, path in enumerate((a, b)))
    return _FirstPass(rows, first_differs, shapes)


def _shape(path: str, per_length: np.ndarray, largest: np.ndarray) -> _Shape:
    present = np.flatnonzero(per_length)
    if not len(present):
        return _Shape(0, 0, ())
    shortest, longest = int(present[0]), int(present[-1])
    if shortest == 0:
        raise CodebooksFileError(path, "has an empty Codebook; every POI needs at least one code")
    if longest > shortest + 1:
        raise CodebooksFileError(
            path, f"has Codebooks of {shortest} to {longest} codes; SIDs have one length, plus a dedup code on some"
        )
    sizes = tuple(int(code) + 1 for code in largest[:shortest])
    return _Shape(shortest, int(per_length[longest]) if longest > shortest else 0, sizes)


def _added(total: np.ndarray, more: np.ndarray) -> np.ndarray:
    """Element-wise ``total + more``, the shorter one padded with zeros."""
    grown = np.pad(total, (0, max(0, len(more) - len(total))))
    grown[: len(more)] += more
    return grown


def _maxed(total: np.ndarray, more: np.ndarray) -> np.ndarray:
    """Element-wise maximum, the shorter one padded with ``MISSING``."""
    grown = np.pad(total, (0, max(0, len(more) - len(total))), constant_values=MISSING)
    grown[: len(more)] = np.maximum(grown[: len(more)], more)
    return grown


def _code_grid(path: str, codebook: pa.Array, first_row: int) -> tuple[np.ndarray, np.ndarray]:
    """Codebook lists as an int64 matrix, one row per POI, ``MISSING`` after a shorter list; and the lengths."""
    lengths = pc.list_value_length(codebook).to_numpy().astype(np.int64)
    values = codebook.flatten().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    negative = np.flatnonzero(values < 0)
    if len(negative):
        raise CodebooksFileError(path, f"row {first_row + 1 + rows[negative[0]]} has a negative code")
    grid = np.full((len(lengths), int(lengths.max())), MISSING, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    grid[rows, np.arange(len(values)) - starts[rows]] = values
    return grid, lengths


def _pairs(a: str, b: str) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch]]:
    """Row-aligned batches of both files (each reader gives batches of exactly ``BATCH_ROWS`` rows but the last),
    their Pids checked: ascending in each file and the same in both."""
    batches_a = _ascending(a, iter_codebooks(a, BATCH_ROWS, ["Pid", "Codebook"]))
    batches_b = _ascending(b, iter_codebooks(b, BATCH_ROWS, ["Pid", "Codebook"]))
    rows = 0
    for batch_a in batches_a:
        batch_b = next(batches_b, None)
        if batch_b is None or batch_b.num_rows != batch_a.num_rows:
            _mismatched_rows(a, b, rows, [batch_a, batch_b], batches_a, batches_b)
        pids_a, pids_b = batch_a.column("Pid").to_numpy(), batch_b.column("Pid").to_numpy()
        unequal = np.flatnonzero(pids_a != pids_b)
        if len(unequal):
            at = int(unequal[0])
            reason = f"row {rows + at + 1} has Pid {pids_a[at]} in the first and Pid {pids_b[at]} in the second"
            raise CodebooksMismatchError(a, b, reason)
        rows += batch_a.num_rows
        yield batch_a, batch_b
    rest_b = next(batches_b, None)
    if rest_b is not None:
        _mismatched_rows(a, b, rows, [None, rest_b], batches_a, batches_b)


def _mismatched_rows(
    a: str, b: str, rows: int, current: list[pa.RecordBatch | None], rest_a: Iterator, rest_b: Iterator
) -> None:
    """Read both files to the end (still checking their Pid order) and report their row counts."""
    counts = [rows + (batch.num_rows if batch is not None else 0) for batch in current]
    for side, rest in enumerate((rest_a, rest_b)):
        counts[side] += sum(batch.num_rows for batch in rest)
    raise CodebooksMismatchError(a, b, f"the first has {counts[0]} rows, the second {counts[1]}")


def _ascending(path: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches``, checked to have strictly ascending Pids."""
    previous, rows = np.iinfo(np.int64).min, 0
    for batch in batches:
        pids = batch.column("Pid").to_numpy()
        before = np.concatenate([[previous], pids[:-1]])
        wrong = np.flatnonzero(pids <= before)
        if len(wrong):
            at = int(wrong[0])
            raise CodebooksFileError(
                path,
                f"row {rows + at + 1} has Pid {pids[at]} after Pid {before[at]}; the diff needs rows in ascending Pid "
                "order, as rqvae_ray writes them",
            )
        previous, rows = pids[-1], rows + len(pids)
        yield batch


def _sid_keys(batch: pa.RecordBatch, shape: _Shape) -> np.ndarray:
    """The packed SID of each row (its Codebook without a dedup code), of the file's ``shape``."""
    codebook = batch.column("Codebook")
    lengths = pc.list_value_length(codebook).to_numpy()
    starts = np.cumsum(lengths) - lengths
    values = codebook.flatten().to_numpy()
    codes = np.stack([values[starts + level] for level in range(shape.sid_levels)], axis=1)
    return pack_codes(codes, shape.sizes)


def _located(keys: np.ndarray, unique: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of the ascending ``unique`` is (or would be inserted) in the ascending ``keys``, and whether it is."""
    at = np.searchsorted(keys, unique)
    known = at < len(keys)
    known[known] = keys[at[known]] == unique[known]
    return at, known


def _side_stats(path: str, shape: _Shape, count: np.ndarray) -> SideStats:
    """A file's figures from the POI count of each of its SIDs."""
    collided = count > 1
    return SideStats(
        path=path,
        sid_levels=shape.sid_levels,
        dedup_codes=shape.dedup_codes,
        unique_sids=len(count),
        collided_sids=int(collided.sum()),
        pois_in_collisions=int(count[collided].sum()),
    )


class _SidCounts:
    """Per SID of B, in ascending order: how many POIs hold it. Its size is the number of distinct SIDs."""

    def __init__(self, dtype: np.dtype) -> None:
        self.keys = np.zeros(0, dtype=dtype)
        self.count = np.zeros(0, dtype=np.int64)

    def add(self, keys: np.ndarray) -> None:
        unique, count = np.unique(keys, return_counts=True)
        at, known = _located(self.keys, unique)
        self.count[at[known]] += count[known]
        self.keys = np.insert(self.keys, at[~known], unique[~known])
        self.count = np.insert(self.count, at[~known], count[~known])


class _Groups:
    """Per SID of A, in ascending order: how many POIs hold it, the SID in B of the first of them (``partner``),
    whether they hold more than one SID in B (``split``), and the first ``MOVED_PIDS_SHOWN`` of their Pids (-1 where
    fewer). Its size is the number of distinct SIDs."""

    def __init__(self, dtype: np.dtype, partner_dtype: np.dtype) -> None:
        self.keys = np.zeros(0, dtype=dtype)
        self.count = np.zeros(0, dtype=np.int64)
        self.partner = np.zeros(0, dtype=partner_dtype)
        self.split = np.zeros(0, dtype=bool)
        self.first_pids = np.zeros((0, MOVED_PIDS_SHOWN), dtype=np.int64)

    def add(self, keys: np.ndarray, partners: np.ndarray, pids: np.ndarray) -> None:
        """Count one batch of rows, given in ascending Pid order; ``partners`` are their SIDs in B."""
        order = np.argsort(keys, kind="stable")  # stable: within an SID, rows stay in Pid order
        keys, partners, pids = keys[order], partners[order], pids[order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        sizes = np.diff(np.r_[starts, len(keys)])
        unique, partner = keys[starts], partners[starts]
        split = np.logical_or.reduceat(partners != np.repeat(partner, sizes), starts)
        at, known = _located(self.keys, unique)
        seen, new, where = at[known], ~known, at[~known]
        kept = np.zeros(len(unique), dtype=np.int64)  # Pids already kept per SID
        kept[known] = np.minimum(self.count[seen], MOVED_PIDS_SHOWN)
        self.count[seen] += sizes[known]
        self.split[seen] |= split[known] | (self.partner[seen] != partner[known])
        self.keys = np.insert(self.keys, where, unique[new])
        self.count = np.insert(self.count, where, sizes[new])
        self.partner = np.insert(self.partner, where, partner[new])
        self.split = np.insert(self.split, where, split[new])
        self.first_pids = np.insert(self.first_pids, where, -1, axis=0)
        slot = np.repeat(kept, sizes) + np.arange(len(keys)) - np.repeat(starts, sizes)
        row = np.repeat(np.searchsorted(self.keys, unique), sizes)
        fits = slot < MOVED_PIDS_SHOWN
        self.first_pids[row[fits], slot[fits]] = pids[fits]


def _print(diff: SidDiff) -> None:
    console = Console()
    sides = Table(title="SID diff", title_justify="left")
    sides.add_column("")
    sides.add_column("A")
    sides.add_column("B")
    for label, name in (
        ("file", "path"),
        ("SID levels", "sid_levels"),
        ("rows with a dedup code", "dedup_codes"),
        ("unique SIDs", "unique_sids"),
        ("collided SIDs (2+ POIs)", "collided_sids"),
        ("POIs in collided SIDs", "pois_in_collisions"),
    ):
        sides.add_row(label, str(getattr(diff.a, name)), str(getattr(diff.b, name)))
    console.print(sides)
    share = f" ({diff.sid_differs / diff.pois:.2%})" if diff.pois else ""
    console.print(f"POIs: {diff.pois}; whole SID differs: {diff.sid_differs}{share}")
    if diff.sid_differs:
        levels = Table()
        levels.add_column("first differing level", justify="right")
        levels.add_column("POIs", justify="right")
        for level, count in enumerate(diff.first_differs_at_level, start=1):
            levels.add_row(str(level), str(count))
        console.print(levels)
    shown = f" (first Pids: {', '.join(map(str, diff.moved_pids))})" if diff.moved_pids else ""
    console.print(f"POIs that moved between collision groups: {diff.moved_pois}{shown}")


app = typer.Typer(add_completion=False, help="Compare the SIDs of two codebooks files of the same POIs.")


@app.command(add_help_option=False)
def diff(
    a: Annotated[Path, typer.Argument(help="First codebooks file (CSV or Parquet).")],
    b: Annotated[Path, typer.Argument(help="Second codebooks file (CSV or Parquet).")],
    json_output: Annotated[bool, flag("--json", "Print one JSON object instead of tables.")] = False,
    _help: HelpFlag = False,
) -> None:
    """How the SIDs of two codebooks files of the same POIs differ, level by level and by collision group."""
    try:
        result = diff_codebooks(a, b)
    except RqvaeRayError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if json_output:
        typer.echo(json.dumps(result.to_dict()))
    else:
        _print(result)


def main() -> None:
    """Entry point of ``python -m rqvae_ray.diff``."""
    app(prog_name="python -m rqvae_ray.diff")


if __name__ == "__main__":
    main()
