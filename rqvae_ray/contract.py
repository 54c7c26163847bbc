"""The typed contract between the encode stage and the final writer.

:class:`OutputSpec` says what a run writes (format, dedup, SID tokens). :class:`EncodedColumns` is what one model
contributes to a block: the encode stage builds it, :class:`ModelSlot` attaches it to the block under that model's
slot and the writer reads it back through the same slot, so neither side spells a column name.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum

import pyarrow as pa


class OutputFormat(str, Enum):
    """The file format of the codebooks files."""

    CSV = "csv"
    PARQUET = "parquet"

    @property
    def extension(self) -> str:
        return self.value


@dataclass(frozen=True)
class OutputSpec:
    """What every model's output holds: the format, dedup codes, and the SID token column."""

    fmt: OutputFormat = OutputFormat.CSV
    dedup: bool = False
    sid_tokens: bool = False

    @property
    def text_parts(self) -> bool:
        """CSV whose lines the writer completes (it adds the dedup codes once every SID is counted)."""
        return self.fmt is OutputFormat.CSV and self.dedup


@dataclass(frozen=True)
class EncodedColumns:
    """One model's output for the rows of a block, in the form the writer appends to its file.

    ``sid`` is always there (one int64 per row that identifies its SID, see :func:`rqvae_ray.sid_stats.pack_codes`),
    and ``seconds`` (whose sum over a file is the time its model spent encoding, over all actors).
    CSV without dedup has finished ``lines``; CSV with dedup has the ``head`` and ``tail`` around the place of the
    dedup code (and the ``tokens`` field); Parquet has ``codebook`` and ``vector`` (and the ``tokens`` string).
    """

    sid: pa.Array
    seconds: pa.Array | None = None  # float64 per row: its share of the time the model took to encode its batch
    lines: pa.Array | None = None
    head: pa.Array | None = None
    tail: pa.Array | None = None
    tokens: pa.Array | None = None
    codebook: pa.Array | None = None
    vector: pa.Array | None = None


_PARTS = tuple(part.name for part in fields(EncodedColumns))


@dataclass(frozen=True)
class ModelSlot:
    """Where one model's :class:`EncodedColumns` travel in a block (the ``index``-th model of its dataset)."""

    index: int

    def _column(self, part: str) -> str:
        return f"m{self.index}.{part}"

    def attach(self, table: pa.Table, encoded: EncodedColumns) -> pa.Table:
        """``table`` with this model's columns appended."""
        for part in _PARTS:
            values = getattr(encoded, part)
            if values is not None:
                table = table.append_column(self._column(part), values)
        return table

    def read(self, table: pa.Table) -> EncodedColumns:
        """This model's columns of a block built by :meth:`attach`."""
        names = set(table.column_names)
        return EncodedColumns(
            **{part: table.column(self._column(part)) for part in _PARTS if self._column(part) in names}
        )
