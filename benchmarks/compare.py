"""Read the codes of a codebooks file (CSV or Parquet, either system) and compare two systems' outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def output_file(out_dir: Path, model_id: str, fmt: str = "csv", base_folder: str = "LLM Dataset") -> Path:
    """Where the product puts ``model_id``'s codebooks file under ``out_dir`` (its own layout helpers)."""
    from rqvae_ray.core.contract import OutputFormat
    from rqvae_ray.inputs.model_ids import parse_model_id
    from rqvae_ray.outputs.layout import codebooks_filename, output_dir

    spec = parse_model_id(model_id)
    return output_dir(out_dir, spec.dataset_repo, base_folder) / codebooks_filename(spec.name, OutputFormat(fmt))


def _first_levels(lists: pa.ListArray) -> np.ndarray:
    """int32 [n, L] of the first L entries of each list, L the shortest list's length (a ``--dedup`` extra code that
    only POIs sharing an SID carry is not part of the SID)."""
    if len(lists) == 0:
        return np.empty((0, 0), dtype=np.int32)
    offsets = lists.offsets.to_numpy()
    flat = pc.cast(lists.values, pa.int32()).to_numpy(zero_copy_only=False)
    levels = int(np.diff(offsets).min())
    return flat[offsets[:-1, None] + np.arange(levels)[None, :]]


def _codes_from_strings(text: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``"[1, 2, 3]"`` strings to an int32 [n, levels] array."""
    if isinstance(text, pa.ChunkedArray):
        text = text.combine_chunks()
    if len(text) == 0:
        return np.empty((0, 0), dtype=np.int32)
    inner = pc.utf8_slice_codeunits(text, 1, -1)
    return _first_levels(pc.split_pattern(inner, ", "))


def product_csv_bytes(pids: np.ndarray, codes: np.ndarray, vectors: np.ndarray) -> bytes:
    """The product's CSV lines (without header) for these rows, whichever version of its formatting API is present."""
    from rqvae_ray.core import formatting

    if hasattr(formatting, "csv_parts"):
        lines = formatting.csv_lines(formatting.csv_parts(pids, codes, vectors, tokens=False))
    else:
        lines = formatting.csv_lines(pids, codes, vectors)
    return formatting.string_bytes(lines)


def read_codes(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(Pid int64 [n], codes int32 [n, levels]) of a ``Pid,Codebook,Vector`` file, streamed (memory ~ the codes)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["Pid", "Codebook"])
        codebook = table.column("Codebook").combine_chunks()
        if isinstance(codebook, pa.FixedSizeListArray):
            codebook = pc.cast(codebook, pa.list_(codebook.type.value_type))
        return table.column("Pid").to_numpy().astype(np.int64), _first_levels(codebook)
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=64 << 20),
        convert_options=pacsv.ConvertOptions(
            include_columns=["Pid", "Codebook"], column_types={"Pid": pa.int64(), "Codebook": pa.string()}
        ),
    )
    pids, codes = [], []
    for batch in reader:
        pids.append(batch.column("Pid").to_numpy())
        codes.append(_codes_from_strings(batch.column("Codebook")))
    if not pids:
        return np.empty(0, dtype=np.int64), np.empty((0, 0), dtype=np.int32)
    return np.concatenate(pids), np.concatenate(codes)


@dataclass
class CodeComparison:
    model_id: str
    rows: int
    equal_rows: int
    pids_equal: bool

    @property
    def differing(self) -> int:
        return self.rows - self.equal_rows

    @property
    def fraction_equal(self) -> float:
        return self.equal_rows / self.rows if self.rows else 1.0


def compare_files(model_id: str, ours: Path, baseline: Path) -> CodeComparison:
    """Row-by-row comparison of the codes in two files of the same model."""
    pid_a, codes_a = read_codes(ours)
    pid_b, codes_b = read_codes(baseline)
    if codes_a.shape != codes_b.shape:
        rows = max(len(codes_a), len(codes_b))
        return CodeComparison(model_id, rows, 0, False)
    equal = int((codes_a == codes_b).all(axis=1).sum()) if len(codes_a) else 0
    return CodeComparison(model_id, len(codes_a), equal, bool(np.array_equal(pid_a, pid_b)))
