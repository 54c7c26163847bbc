"""The cap spool (``--max-per-sid``): per new row its packed SID, error and latent wait on disk until every SID is
counted; then the POIs that move and their new SIDs are decided (:mod:`rqvae_ray.core.sid_cap`) and each spooled
batch of rows is rewritten where it holds a moved POI, with the same formatting code as the encode stage."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from rqvae_ray.core.contract import EncodedColumns
from rqvae_ray.core.sid_cap import Placement, latent_values, movers, quantization_errors
from rqvae_ray.core.sid_stats import SidCounter, SidLayout


@dataclass(frozen=True)
class Moves:
    """The POIs that moved: their rows among the new ones (ascending), their new packed SIDs, and the sum of their
    extra distances (new error less old, added in the order they moved)."""

    rows: np.ndarray
    sids: np.ndarray
    extra: float

    def figures(self, max_per_sid: int) -> dict[str, int | float]:
        """The cap's figures for the quality report."""
        moved = len(self.rows)
        return {
            "max_per_sid": max_per_sid,
            "moved_pois": moved,
            "extra_distance_sum": self.extra,
            "extra_distance_mean": self.extra / moved if moved else 0.0,
        }

    def apply(
        self,
        first_row: int,
        pids: pa.Array,
        encoded: EncodedColumns,
        fresh: Callable[[np.ndarray, np.ndarray], EncodedColumns],
    ) -> EncodedColumns:
        """Spooled rows ``first_row..`` with every moved POI's columns made afresh by ``fresh(Pids, packed SIDs)``."""
        low, high = np.searchsorted(self.rows, [first_row, first_row + len(pids)])
        if low == high:
            return encoded
        at = self.rows[low:high] - first_row
        sids = self.sids[low:high]
        made = fresh(pids.to_numpy()[at], sids)
        index = np.arange(len(pids))
        index[at] = len(pids) + np.arange(len(at))
        taken = pa.array(index)
        return replace(
            encoded,
            **{
                part.name: pa.concat_arrays(
                    [_whole(getattr(encoded, part.name)), _whole(getattr(made, part.name))]
                ).take(taken)
                for part in fields(EncodedColumns)
                if getattr(encoded, part.name) is not None and getattr(made, part.name) is not None
            },
        )


def _whole(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


class CapSpool:
    """The new rows' packed SIDs, errors and latents of one model, in Pid order, in one file of fixed-size records."""

    def __init__(self, path: Path, layout: SidLayout, codebooks: tuple[np.ndarray, ...], max_per_sid: int) -> None:
        self.path = path
        self.layout = layout
        self.books = tuple(book.astype(np.float64) for book in codebooks)
        self.max_per_sid = max_per_sid
        self.dtype = np.dtype([("sid", layout.dtype), ("error", "<f8"), ("latent", "<f8", (codebooks[0].shape[1],))])
        self._file = path.open("wb")
        self.rows = 0

    def add(self, sids: np.ndarray, latent: pa.Array | pa.ChunkedArray) -> None:
        """Spool the next rows: their packed SIDs and their latents (a column made by ``latent_array``)."""
        values = latent_values(latent)
        records = np.empty(len(sids), dtype=self.dtype)
        records["sid"] = sids
        records["error"] = quantization_errors(values, self.layout.unpack(sids), self.books)
        records["latent"] = values
        self._file.write(records.tobytes())
        self.rows += len(sids)

    def moves(self, counter: SidCounter) -> Moves:
        """Decide who moves where (``counter`` counts every POI, and then their new SIDs); the spool is removed."""
        self._file.close()
        records = np.memmap(self.path, dtype=self.dtype, mode="r") if self.rows else np.empty(0, self.dtype)
        rows = movers(records["sid"], records["error"], counter, self.max_per_sid)
        old = np.asarray(records["sid"][rows])
        counter.remove(old)
        placement = Placement(counter, self.books, self.max_per_sid)
        new = np.empty(len(rows), dtype=self.layout.dtype)
        extra = 0.0
        for index, (row, codes) in enumerate(zip(rows.tolist(), self.layout.unpack(old), strict=True)):
            record = records[row]
            codes_now, error = placement.place(np.asarray(record["latent"]), codes)
            new[index] = self.layout.pack(codes_now[None, :])[0]
            extra += error - float(record["error"])
        del records
        self.path.unlink()
        order = np.argsort(rows, kind="stable")
        return Moves(rows[order], new[order], extra)

    def discard(self) -> None:
        """Close and delete the spool."""
        with contextlib.suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)
