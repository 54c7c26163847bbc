"""Starting a codebooks file from the rows of an existing one: what to keep (:class:`ExistingRows`) and the reader
that hands them to the writer in order (:class:`ExistingReader`).

``--keep-existing`` starts a model's new file with every row of its published file; resuming an interrupted run can
start it from a partial file and the rows it holds. Either way the writer streams those rows once, in step with the
blocks that arrive, and seeds from them its Pid count, SID counts, dedup codes, sha256 and exports; CSV lines are
copied byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa

from rqvae_ray.errors import OutputError

READ_ROWS = 16384  # rows per batch read from the existing file (a CSV batch of NYC rows is ~12 MB of text)
LINE_BYTES = 1 << 20


@dataclass(frozen=True)
class ExistingRows:
    """The first ``rows`` rows (Pids 1..rows) of the codebooks file ``path``, which a model's new file starts with,
    taken as they are. ``sha256`` is recorded as the file extended. With ``verify`` the blocks hold these rows too,
    freshly encoded, and the writer refuses the file if any of them now has another SID than in ``path``."""

    path: str
    rows: int
    sha256: str = ""
    verify: bool = False


class ExistingReader:
    """Reads the kept rows in order, exactly as many as asked each time; for CSV it also copies their lines."""

    def __init__(self, existing: ExistingRows, csv: bool) -> None:
        from rqvae_ray.outputs.readers import (
            iter_codebooks,  # here, so that a writer actor that keeps nothing skips pandas
        )

        self.existing = existing
        self.taken = 0
        columns = ("Pid", "Codebook") if csv else None  # CSV Vectors are copied as text, never parsed
        self._batches = iter_codebooks(existing.path, READ_ROWS, columns)
        self._pending: pa.RecordBatch | None = None
        self._text: BinaryIO | None = Path(existing.path).open("rb") if csv else None
        self._buffer = b""

    @property
    def remaining(self) -> int:
        return self.existing.rows - self.taken

    def take(self, count: int) -> pa.Table:
        """The next ``count`` rows (Pid, Codebook and, for Parquet, the other columns)."""
        pieces, held = [], 0
        while held < count:
            batch = self._pending if self._pending is not None else next(self._batches, None)
            self._pending = None
            if batch is None:
                raise self._short(self.taken + held)
            if batch.num_rows > count - held:
                batch, self._pending = batch.slice(0, count - held), batch.slice(count - held)
            pieces.append(batch)
            held += batch.num_rows
        self.taken += count
        return pa.Table.from_batches(pieces)

    def copy_lines(self, count: int, out) -> None:
        """Write the next ``count`` lines of the CSV file, as they are, to ``out``."""
        while count:
            if not self._buffer:
                self._buffer = self._text.read(LINE_BYTES)
                if not self._buffer:
                    raise self._short(self.taken)
            ends = np.flatnonzero(np.frombuffer(self._buffer, dtype=np.uint8) == ord("\n"))
            if len(ends) >= count:
                cut = int(ends[count - 1]) + 1
                out.write(self._buffer[:cut])
                self._buffer = self._buffer[cut:]
                return
            out.write(self._buffer)
            count -= len(ends)
            self._buffer = b""

    def _short(self, rows: int) -> OutputError:
        return OutputError(
            f"{self.existing.path} ends after {rows} rows, before the {self.existing.rows} to keep; use --force to "
            "redo it from scratch",
            path=self.existing.path,
        )

    def close(self) -> None:
        if self._text is not None:
            self._text.close()
