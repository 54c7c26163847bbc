"""The dedup spool: with ``--dedup`` a model's new rows wait on disk (Arrow IPC) while every SID is counted; at close
they stream once more, with the dedup codes, in Pid order."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from rqvae_ray.core.contract import EncodedColumns
from rqvae_ray.core.sid_stats import SidCounter


class DedupSpool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = None

    def add(self, pids: pa.ChunkedArray, encoded: EncodedColumns) -> None:
        parts = {name: value for name, value in vars(encoded).items() if value is not None}
        table = pa.table({"Pid": pids, **parts})
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, table.schema)
        self._writer.write_table(table)

    def replay(
        self, counter: SidCounter, fixed_length: bool
    ) -> Iterator[tuple[pa.ChunkedArray, EncodedColumns, np.ndarray]]:
        """Every spooled row in order, with its dedup code (-1: none); the spool is removed after."""
        if self._writer is None:
            return
        self._writer.close()
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                encoded = EncodedColumns(**{name: batch.column(name) for name in batch.schema.names if name != "Pid"})
                packed = counter.layout.from_arrow(encoded.sid)
                yield batch.column("Pid"), encoded, counter.dedup_codes(packed, fixed_length)
        self.path.unlink()

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, ValueError, pa.ArrowException):
                self._writer.close()
        self.path.unlink(missing_ok=True)
