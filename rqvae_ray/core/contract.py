"""The typed contract between the encode stage and the writer.

:class:`OutputSpec` says what a run writes (format, dedup, SID tokens). :class:`EncodedColumns` is what one model
contributes to a block: the encode stage builds it, :class:`ModelSlot` attaches it to the block under that model's
slot and the writer reads it back through the same slot, so neither side spells a column name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum

import numpy as np
import pyarrow as pa

from rqvae_ray.core.checkpoint import ModelWeights
from rqvae_ray.core.choices import parse_choices
from rqvae_ray.core.formatting import SidLines, SidParts, csv_lines, csv_parts, sid_tokens
from rqvae_ray.core.presets import CONVENTIONS, Preset, PresetFile
from rqvae_ray.core.sid_stats import sid_array, sid_layout
from rqvae_ray.errors import OutputError


class OutputFormat(str, Enum):
    """The file format of the codebooks files."""

    CSV = "csv"
    PARQUET = "parquet"

    @property
    def extension(self) -> str:
        return self.value


class Export(str, Enum):
    """A file written beside a model's codebooks file: ``codebooks-<model>.<suffix>``."""

    INDEX_JSON = "index-json"
    TENSOR = "tensor"
    PREFIXES = "prefixes"

    @property
    def suffix(self) -> str:
        return {"index-json": "index.json", "tensor": "sids.pt", "prefixes": "prefixes.json"}[self.value]

    @classmethod
    def parse(cls, text: str) -> frozenset[Export]:
        """The exports named in a comma-separated list such as ``index-json,tensor``."""
        return parse_choices(cls, text, "--export", "an export")


@dataclass(frozen=True)
class OutputSpec:
    """What every model's output holds: the format, dedup codes (``fixed_length``: on every POI), the SID token
    column, the files exported beside it, whether the rows of an existing file are kept (``keep_existing``), the
    trainers' presets whose files are written too (already applied to the other fields by ``make_options``), and the
    cap on POIs per SID (``max_per_sid``)."""

    fmt: OutputFormat = OutputFormat.CSV
    dedup: bool = False
    sid_tokens: bool = False
    fixed_length: bool = False
    exports: frozenset[Export] = frozenset()
    keep_existing: bool = False
    presets: frozenset[Preset] = frozenset()
    max_per_sid: int | None = None  # at most this many POIs keep one SID (see rqvae_ray.core.sid_cap); None: no cap

    def __post_init__(self) -> None:
        if self.fixed_length and not self.dedup:
            raise OutputError("--fixed-length gives every POI a dedup code, so it needs --dedup; add --dedup")
        if self.max_per_sid is not None and self.max_per_sid < 1:
            raise OutputError(
                f"--max-per-sid {self.max_per_sid}: at most K POIs keep one SID, so K must be 1 or more; give a K "
                "of 1 or more, or leave the option out"
            )

    @property
    def text_parts(self) -> bool:
        """CSV whose lines the writer completes (it adds the dedup codes once every SID is counted)."""
        return self.fmt is OutputFormat.CSV and self.dedup

    @property
    def exported(self) -> tuple[Export, ...]:
        """Every file written beside the codebooks file, in a fixed order: the asked exports, plus the prefixes
        whenever there is a dedup code or any export."""
        wanted = set(self.exports)
        if self.dedup or wanted:
            wanted.add(Export.PREFIXES)
        return tuple(export for export in Export if export in wanted)

    @property
    def preset_files(self) -> tuple[PresetFile, ...]:
        """The files written for the presets, in a fixed order (a file two presets read is written once)."""
        wanted = {file for preset in self.presets for file in CONVENTIONS[preset].files}
        return tuple(file for file in PresetFile if file in wanted)

    @property
    def written_kinds(self) -> list[str]:
        """The kinds of every file written beside the codebooks file, as its manifest entry records them."""
        return [export.value for export in self.exported] + [file.value for file in self.preset_files]


@dataclass(frozen=True)
class EncodedColumns:
    """One model's output for the rows of a block, in the form the writer appends to its file.

    ``sid`` is always there (per row its packed SID, see :class:`rqvae_ray.core.sid_stats.SidLayout`: one int64, or
    a fixed-size list of int64 words for codebook sizes that multiply past 2**63), and ``seconds`` (whose sum over
    a file is the time its model spent encoding, over all actors or threads).
    CSV without dedup has finished ``lines``; CSV with dedup has the ``head`` and ``tail`` around the place of the
    dedup code (and the ``tokens`` field); Parquet has only the ``tokens`` string when asked for: the writer builds
    the Codebook and Vector columns from the codes (the Vector is the sum of the codewords, a function of the codes),
    so that Ray's encoder actors ship 8 bytes per row and model (per word of a wide SID) rather than ~290.
    """

    sid: pa.Array
    seconds: pa.Array | None = None  # float64 per row: its share of the time the model took to encode its batch
    lines: pa.Array | None = None
    head: pa.Array | None = None
    tail: pa.Array | None = None
    tokens: pa.Array | None = None
    latent: pa.Array | None = None  # with --max-per-sid: z (float64 [latent]), for the POIs that move


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


@dataclass(frozen=True)
class StageModel:
    """One model an encode stage holds: its ID, its slot in the blocks and its frozen weights."""

    model_id: str
    slot: int
    weights: ModelWeights


class RowText:
    """CSV text formatted row by row, for SIDs too wide for the per-SID caches' int64 keys (most are distinct)."""

    def __init__(self, vectors_of: Callable[[np.ndarray], np.ndarray], tokens: bool) -> None:
        self._vectors_of = vectors_of
        self.tokens = tokens

    def csv_parts(self, pids: np.ndarray, codes: np.ndarray, packed: np.ndarray) -> dict[str, pa.Array]:
        """The same pieces as :meth:`SidParts.csv_parts`."""
        return csv_parts(pids, codes, self._vectors_of(codes), self.tokens)

    def csv_lines(self, pids: np.ndarray, codes: np.ndarray, packed: np.ndarray) -> pa.Array:
        """The same lines as :meth:`SidLines.csv_lines`."""
        return csv_lines(self.csv_parts(pids, codes, packed))


CsvText = SidParts | SidLines | RowText


def csv_text(
    vectors_of: Callable[[np.ndarray], np.ndarray], tokens: bool, sizes: tuple[int, ...], lines: bool
) -> CsvText:
    """A model's CSV text maker: whole ``lines``, or the parts around the dedup code; through the per-SID cache when
    one int64 holds its packed SIDs, else row by row."""
    if sid_layout(sizes).wide:
        return RowText(vectors_of, tokens)
    return SidLines(vectors_of, tokens) if lines else SidParts(vectors_of, tokens)


def encoded_columns(
    pids: np.ndarray, codes: np.ndarray, packed: np.ndarray, spec: OutputSpec, text: CsvText | None
) -> EncodedColumns:
    """A model's output columns for rows of known codes and packed SIDs (``text``: its :func:`csv_text`, for CSV,
    made with ``lines=not spec.text_parts``)."""
    sid = sid_array(packed)
    if text is not None:
        if spec.text_parts:  # the writer adds the dedup codes once every SID is counted
            parts = text.csv_parts(pids, codes, packed)
            return EncodedColumns(sid, head=parts["head"], tail=parts["tail"], tokens=parts.get("tokens"))
        return EncodedColumns(sid, lines=text.csv_lines(pids, codes, packed))
    return EncodedColumns(sid, tokens=sid_tokens(codes) if spec.sid_tokens else None)
