"""The row spool: with ``--dedup`` or ``--max-per-sid`` a model's new rows wait on disk (Arrow IPC) while every SID
is counted; at close they stream once more, in Pid order, to be moved and given their dedup codes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from rqvae_ray.core.contract import EncodedColumns


class RowSpool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = None

    def add(self, pids: pa.ChunkedArray, encoded: EncodedColumns) -> None:
        # The latents are the cap spool's (read by row, for the POIs that move).
        parts = {name: value for name, value in vars(encoded).items() if value is not None and name != "latent"}
        table = pa.table({"Pid": pids, **parts})
        if self._writer is None:
            self._writer = pa.ipc.new_file(self.path, table.schema)
        self._writer.write_table(table)

    def replay(self) -> Iterator[tuple[pa.Array, EncodedColumns]]:
        """Every spooled row in order, in batches; the spool is removed after."""
        if self._writer is None:
            return
        self._writer.close()
        with pa.memory_map(str(self.path)) as source:
            reader = pa.ipc.open_file(source)
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                yield (
                    batch.column("Pid"),
                    EncodedColumns(**{name: batch.column(name) for name in batch.schema.names if name != "Pid"}),
                )
        self.path.unlink()

    def discard(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(OSError, ValueError, pa.ArrowException):
                self._writer.close()
        self.path.unlink(missing_ok=True)
