"""The files exported beside a model's codebooks file, written as its rows are, under partial names.

* ``codebooks-<model>.index.json``: ``{"<Pid>": ["<a_5>", "<b_28>", "<c_25>"(, "<d_0>")], ...}``, one entry per
  line in Pid order, streamed.
* ``codebooks-<model>.sids.pt``: an int64 tensor ``[levels, N]`` (column i is Pid i+1; with dedup the last level is
  the dedup code, -1 where a POI has none), filled block by block in a raw file on disk and saved through a tensor
  mapped from it, so the writer never holds it in memory. torch is imported only for this export.
* ``codebooks-<model>.prefixes.json``: for each proper prefix of every SID (the dedup code is the last level), keyed
  by its codes joined with commas, the sorted codes that may follow it; built from the SID counts when the file is
  complete, so memory is bounded by the number of distinct SIDs.

and the files written for ``--for`` presets (:class:`~rqvae_ray.core.presets.PresetFile`), streamed the same way:
the item-to-token map keyed by 0-based item ids, TIGER's ``[N, levels + 1]`` tensor and GNPR-SID V2's CSV.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rqvae_ray.core.contract import Export, OutputSpec, csv_text
from rqvae_ray.core.encoder import codeword_sums
from rqvae_ray.core.formatting import csv_lines, index_json_entries, int_strings, joined_rows, string_buffers
from rqvae_ray.core.presets import PresetFile
from rqvae_ray.core.sid_stats import SidCounter, prefix_starts, sid_layout, unpack_codes
from rqvae_ray.outputs.layout import export_filename, preset_filename
from rqvae_ray.outputs.staging import HashingFile, partial_path

# SIDs per piece of the prefixes file's dedup level (each lists its codes 0..k-1).
PREFIX_CHUNK = 65536


class _Exported:
    """One exported file being written: its final name, partial name and hashing handle."""

    # Whether it is made from the rows' codes as they arrive (else at close, from the SID counts alone).
    TAKES_ROWS = False

    def __init__(self, export: Export | PresetFile, final: Path) -> None:
        self.export = export  # its kind, as the manifest records it
        self.final = final
        self.partial = partial_path(final)
        self.handle = HashingFile(self.partial)

    def add(self, pids: np.ndarray, codes: np.ndarray) -> None:
        """Take the final codes (``[n, levels]``, -1: no dedup code) of the next rows, Pids ``pids``."""

    def close(self, counter: SidCounter) -> None:
        self.handle.close()

    def leftovers(self) -> list[Path]:
        """Every file this export may have on disk until it is published."""
        return [self.partial]

    @property
    def sha256(self) -> str:
        return self.handle.digest.hexdigest()


class _JsonMap(_Exported):
    """A JSON object written entry by entry, one per line."""

    def __init__(self, export: Export | PresetFile, final: Path) -> None:
        super().__init__(export, final)
        self.handle.write(b"{")
        self._separator = b"\n"

    def write_entries(self, entries: pa.Array) -> None:
        if not len(entries):
            return
        text = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(entries)], pa.int32()), entries), ",\n")
        self.handle.write(self._separator)
        self.handle.writelines(string_buffers(text))
        self._separator = b",\n"

    def close(self, counter: SidCounter) -> None:
        self.handle.write(b"\n}\n")
        super().close(counter)


class _IndexJson(_JsonMap):
    """Keyed by Pid, or by the 0-based item id Pid - 1 (``first_id`` 0)."""

    TAKES_ROWS = True

    def __init__(self, export: Export | PresetFile, final: Path, first_id: int = 1) -> None:
        super().__init__(export, final)
        self.shift = 1 - first_id

    def add(self, pids: np.ndarray, codes: np.ndarray) -> None:
        self.write_entries(index_json_entries(pids - self.shift, codes))


class _SidTensor(_Exported):
    """``[levels, N]`` (column i is Pid i+1), or ``[N, levels]`` (row i) with ``items_first``."""

    TAKES_ROWS = True

    def __init__(
        self, export: Export | PresetFile, final: Path, levels: int, num_pois: int, items_first: bool = False
    ) -> None:
        super().__init__(export, final)
        self.raw_path = partial_path(final, "raw")
        self.items_first = items_first
        self.shape = (num_pois, levels) if items_first else (levels, num_pois)
        self._raw = np.memmap(self.raw_path, dtype="<i8", mode="w+", shape=self.shape)

    def add(self, pids: np.ndarray, codes: np.ndarray) -> None:
        if len(pids):
            rows = slice(int(pids[0]) - 1, int(pids[-1]))
            if self.items_first:
                self._raw[rows] = codes
            else:
                self._raw[:, rows] = codes.T

    def close(self, counter: SidCounter) -> None:
        import torch

        self._raw.flush()
        del self._raw
        rows, columns = self.shape
        mapped = torch.from_file(str(self.raw_path), shared=False, size=rows * columns, dtype=torch.int64)
        # Saved through a file object: a path would put its (random, partial) name inside the archive.
        torch.save(mapped.view(rows, columns), self.handle)
        super().close(counter)
        self.raw_path.unlink()

    def leftovers(self) -> list[Path]:
        return [self.partial, self.raw_path]


class _CodebooksCsv(_Exported):
    """The codebooks CSV's lines (without SID tokens) under another header: GNPR-SID V2's ``pid,sid,vector``."""

    TAKES_ROWS = True

    def __init__(
        self, export: PresetFile, final: Path, header: bytes, codebooks: tuple[np.ndarray, ...], sizes: tuple[int, ...]
    ) -> None:
        super().__init__(export, final)
        self.levels = len(sizes)
        self.layout = sid_layout(sizes)
        self.text = csv_text(functools.partial(codeword_sums, codebooks), False, sizes, lines=False)
        self.handle.write(header)

    def add(self, pids: np.ndarray, codes: np.ndarray) -> None:
        sids = codes[:, : self.levels]
        parts = self.text.csv_parts(pids, sids, self.layout.pack(sids))
        extra = codes[:, self.levels] if codes.shape[1] > self.levels else None
        self.handle.writelines(string_buffers(csv_lines(parts, extra, self.levels)))


class _Prefixes(_JsonMap):
    def __init__(self, export: Export, final: Path, dedup: bool) -> None:
        super().__init__(export, final)
        self.dedup = dedup

    def close(self, counter: SidCounter) -> None:
        for entries in prefix_entries(counter, self.dedup):
            self.write_entries(entries)
        super().close(counter)


def _lines(keys: np.ndarray, offsets: np.ndarray, children: np.ndarray) -> pa.Array:
    """``"k1,k2": [c1, c2, ...]`` for each key row and its slice ``offsets[i]:offsets[i+1]`` of ``children``."""
    listed = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), int_strings(children)), ", ")
    return pc.binary_join_element_wise('"', joined_rows(keys, int_strings, ","), '": [', listed, "]", "")


def prefix_entries(counter: SidCounter, dedup: bool) -> Iterator[pa.Array]:
    """The entries of the prefixes file, in pieces: prefixes by length, each length in ascending code order."""
    sids, _ = counter.items()
    codes = unpack_codes(sids, counter.sizes)  # ascending SIDs: rows in lexicographic order
    begins = prefix_starts(codes)
    for length in range(len(counter.sizes)):
        pairs = codes[begins[length], : length + 1]
        keys = pairs[:, :length]
        starts = np.flatnonzero(begins[length - 1][begins[length]]) if length else np.zeros(1, dtype=np.int64)
        offsets = np.r_[starts, len(pairs)].astype(np.int32)
        yield _lines(keys[starts], offsets, pairs[:, length])
    if not dedup:
        return
    next_codes = counter.next_code_of(sids)
    coded = np.flatnonzero(next_codes > 0)
    for start in range(0, len(coded), PREFIX_CHUNK):
        chunk = coded[start : start + PREFIX_CHUNK]
        counts = next_codes[chunk]
        offsets = np.zeros(len(chunk) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        children = np.arange(offsets[-1]) - np.repeat(offsets[:-1], counts)
        yield _lines(codes[chunk], offsets, children)


class ModelExports:
    """Every file exported, or written for a preset, beside one model's codebooks file ``final`` (its model's
    ``codebooks``, for files that hold the Vector); ``num_pois`` rows arrive in Pid order."""

    def __init__(
        self,
        final: Path,
        spec: OutputSpec,
        sizes: tuple[int, ...],
        num_pois: int,
        codebooks: tuple[np.ndarray, ...] = (),
    ) -> None:
        levels = len(sizes) + (1 if spec.dedup else 0)
        self.files: list[_Exported] = []
        try:
            for export in spec.exported:
                path = final.with_name(export_filename(final.name, export))
                if export is Export.INDEX_JSON:
                    self.files.append(_IndexJson(export, path))
                elif export is Export.TENSOR:
                    self.files.append(_SidTensor(export, path, levels, num_pois))
                else:
                    self.files.append(_Prefixes(export, path, spec.dedup))
            for file in spec.preset_files:
                path = final.with_name(preset_filename(final.name, file))
                if file is PresetFile.ITEMS_INDEX_JSON:
                    self.files.append(_IndexJson(file, path, first_id=0))
                elif file is PresetFile.TIGER_TENSOR:
                    self.files.append(_SidTensor(file, path, levels, num_pois, items_first=True))
                else:
                    self.files.append(_CodebooksCsv(file, path, b"pid,sid,vector\n", codebooks, sizes))
        except BaseException:
            self.discard()
            raise

    @property
    def takes_rows(self) -> bool:
        """Whether :meth:`add` is needed: some file is made from the rows' codes (not only from the SID counts)."""
        return any(exported.TAKES_ROWS for exported in self.files)

    def add(self, pids: np.ndarray, codes: np.ndarray) -> None:
        """The final codes of the next rows: ``[n, levels]``, -1 where a POI has no dedup code."""
        for exported in self.files:
            exported.add(pids, codes)

    def close(self, counter: SidCounter) -> None:
        """Finish every file (``counter`` has seen every row)."""
        for exported in self.files:
            exported.close(counter)

    def discard(self) -> None:
        """Close and delete the unpublished files."""
        for exported in self.files:
            exported.handle.close()
            for path in exported.leftovers():
                path.unlink(missing_ok=True)
