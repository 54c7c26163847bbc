"""The resume journal of one file: every SID written so far (one packed int64 per row, or the int64 words of a wide
SID, see :class:`~rqvae_ray.core.sid_stats.SidLayout`), made safe on disk at each checkpoint with a resume state that
says how many rows are safe, so that the next run with the same inputs and options rebuilds those rows from it."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rqvae_ray.core.sid_stats import SidLayout
from rqvae_ray.errors import OutputError
from rqvae_ray.outputs.resume import JOURNAL_ROW_BYTES, ResumeState, journal_path, remove_resume_state
from rqvae_ray.outputs.staging import owner_tag

JOURNAL_DTYPE = np.dtype(f"<i{JOURNAL_ROW_BYTES}")  # one int64 word
REPLAY_ROWS = 1 << 16  # rows rebuilt from a journal at a time
# A journal of wide SIDs starts with this tag and its words per row; a journal of one-word rows has no header, as
# before wide SIDs existed, so that such a journal (of the same resume key) is never read as rows of several words.
WIDE_TAG = b"rqsidwds"


def journal_header(layout: SidLayout) -> bytes:
    """The bytes a journal of SIDs of ``layout`` starts with (none when one word holds them)."""
    return WIDE_TAG + struct.pack("<q", layout.words) if layout.wide else b""


class Journal:
    """The journal of ``final``: continued from its first ``resume_rows`` rows, else started anew."""

    def __init__(self, final: Path, key: str, resume_rows: int, layout: SidLayout) -> None:
        self.final = final
        self.key = key
        self.resume_rows = resume_rows
        self.layout = layout
        self.header = journal_header(layout)
        path = journal_path(final)
        if resume_rows:
            self._file = path.open("r+b")
            self._check(resume_rows)
            self._file.truncate(self._offset(resume_rows))
            self._file.seek(0, os.SEEK_END)
        else:
            remove_resume_state(final)
            self._file = path.open("wb")
            self._file.write(self.header)
        self.rows = resume_rows

    def _offset(self, rows: int) -> int:
        return len(self.header) + rows * JOURNAL_ROW_BYTES * self.layout.words

    def _check(self, rows: int) -> None:
        """The journal to continue must have this model's header and hold ``rows`` rows."""
        held = self._file.read(len(self.header))
        size = os.fstat(self._file.fileno()).st_size
        if held != self.header or size < self._offset(rows):
            self._file.close()
            raise OutputError(
                f"{self.final.name}: its resume journal does not hold the {rows} SIDs of {self.layout.words} word(s) "
                "that its resume state counts; run again to write the file afresh",
                path=str(self.final),
            )

    def append(self, sids: np.ndarray) -> None:
        self._file.write(self.layout.words_of(sids).astype(JOURNAL_DTYPE).tobytes())
        self.rows += len(sids)

    def replay(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The first ``resume_rows`` rows as (Pids, codes, packed SIDs), in chunks."""
        shape = (self.resume_rows, self.layout.words)
        path = journal_path(self.final)
        journal = np.memmap(path, dtype=JOURNAL_DTYPE, mode="r", offset=len(self.header), shape=shape)
        for start in range(0, self.resume_rows, REPLAY_ROWS):
            packed = self.layout.from_words(np.array(journal[start : start + REPLAY_ROWS], dtype=np.int64))
            pids = np.arange(start + 1, start + 1 + len(packed), dtype=np.int64)
            yield pids, self.layout.unpack(packed).astype(np.int32), packed
        del journal

    def checkpoint(self, encode_seconds: float) -> None:
        """Make the SIDs written so far safe on disk and record how many (the resume state of the file)."""
        if self._file.closed:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        inode = os.fstat(self._file.fileno()).st_ino
        ResumeState(self.key, self.rows, encode_seconds, owner_tag(), inode).write(self.final)

    def close(self) -> None:
        self._file.close()
