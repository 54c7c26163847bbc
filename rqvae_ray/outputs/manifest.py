"""The manifest of an output folder (one entry per codebooks file, with its provenance, options, sha256 and SID
statistics) and the up-to-date check made from it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.core.contract import OutputSpec
from rqvae_ray.core.hashing import sha256_files
from rqvae_ray.errors import ManifestError
from rqvae_ray.outputs.layout import MANIFEST_FILE
from rqvae_ray.outputs.staging import atomic_write


@dataclass(frozen=True)
class Provenance:
    """The inputs an output was made from."""

    checkpoint_sha256: str
    checkpoint_revision: str
    features_sha256: str
    features_revision: str


@dataclass
class ExportRecord:
    """One file exported beside a codebooks file: its kind (an :class:`Export` value), name and sha256."""

    kind: str
    file: str
    sha256: str


@dataclass
class ExtendedFile:
    """The codebooks file a run started from (``--keep-existing``): its sha256 and rows, kept as they were."""

    sha256: str
    rows: int


@dataclass
class ManifestEntry:
    """What the manifest records about one output file.

    ``features_rows_sha256`` is :func:`rqvae_ray.inputs.feature_digest.rows_digests` of its rows 1..N (the features of
    exactly the POIs in the file, whatever their file format), ``extends`` the file it extended.
    """

    file: str
    model_id: str
    format: str
    dedup: bool
    sid_tokens: bool
    rows: int
    sha256: str
    checkpoint_sha256: str = ""
    checkpoint_revision: str = ""
    features_sha256: str = ""
    features_revision: str = ""
    tool_version: str = __version__
    written_at: str = ""
    sid_stats: dict = field(default_factory=dict)
    encode_seconds: float = 0.0  # the time the model spent encoding this file's rows, summed over its actors
    # Levels the checkpoint trained with Sinkhorn assignment; the SIDs use the nearest codeword there too.
    sinkhorn_levels: list[int] = field(default_factory=list)
    fixed_length: bool = False
    exports: list[ExportRecord] = field(default_factory=list)
    features_rows_sha256: str = ""
    extends: ExtendedFile | None = None
    max_per_sid: int = 0  # the cap on POIs per SID it was written with (0: none)

    @classmethod
    def from_dict(cls, data: dict) -> ManifestEntry | None:
        """An entry from its JSON form; None when it lacks the fields every entry has or has malformed ones (see
        :meth:`problem`). Unknown fields are ignored."""
        if cls.problem(data):
            return None
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["exports"] = [ExportRecord(r["kind"], r["file"], r["sha256"]) for r in values.get("exports", [])]
        if values.get("extends") is not None:
            values["extends"] = ExtendedFile(values["extends"]["sha256"], values["extends"]["rows"])
        return cls(**values)

    @classmethod
    def problem(cls, data: dict) -> str:
        """What is wrong with an entry's JSON form: a missing field or one of the wrong type; "" when nothing."""
        for item in fields(cls):
            if item.name not in data:
                if item.default is MISSING and item.default_factory is MISSING:
                    return f"it has no {item.name!r}"
                continue
            wanted, check = _NAME_CHECK if item.name == "file" else _FIELD_CHECKS[item.type]
            if not check(data[item.name]):
                return f"its {item.name!r} is {_brief(data[item.name])}, expected {wanted}"
        return ""

    def changed_options(self, spec: OutputSpec) -> list[tuple[str, str]]:
        """The options that change a file's content and that ``spec`` sets otherwise: each as this file was written
        with it and as ``spec`` has it (``("--dedup off", "--dedup on")``)."""
        options = (
            ("--dedup", self.dedup, spec.dedup),
            ("--fixed-length", self.fixed_length, spec.fixed_length),
            ("--sid-tokens", self.sid_tokens, spec.sid_tokens),
        )
        changed = [(f"{flag} {_on(had)}", f"{flag} {_on(wanted)}") for flag, had, wanted in options if had != wanted]
        if self.max_per_sid != (spec.max_per_sid or 0):
            changed.append((_cap(self.max_per_sid), _cap(spec.max_per_sid or 0)))
        return changed

    def matches(self, spec: OutputSpec, provenance: Provenance) -> str:
        """Why this file does not hold what ``spec`` and ``provenance`` ask for; "" when it does."""
        changed = [name for name, value in asdict(provenance).items() if getattr(self, name) != value]
        if changed:
            return "its inputs changed (" + ", ".join(sorted(changed)) + ")"
        options = [now for _had, now in self.changed_options(spec)]
        if options:
            return "it was written with other options (now " + ", ".join(options) + ")"
        wanted_exports = spec.written_kinds
        if sorted(record.kind for record in self.exports) != sorted(wanted_exports):
            return "it was written with other exports (now " + (", ".join(wanted_exports) or "none") + ")"
        if self.tool_version != __version__:
            return f"it was written by rqvae_ray {self.tool_version}"
        return ""


@dataclass
class Manifest:
    """The manifest of one output folder: one entry per output file (the CSV and the Parquet file of a model live
    side by side)."""

    folder: Path
    dataset: str
    entries: dict[str, ManifestEntry] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path, dataset: str) -> Manifest:
        """The manifest in ``folder``; empty when there is none. One that cannot be read, or holds a malformed
        entry, raises :class:`~rqvae_ray.errors.ManifestError`: writing over it would lose the entries it holds."""
        path = folder / MANIFEST_FILE
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            data = None
        except OSError as exc:
            raise ManifestError(str(path), f"the file cannot be read ({exc.strerror or type(exc).__name__})") from None
        return cls.parse(folder, dataset, data)

    @classmethod
    def parse(cls, folder: Path, dataset: str, data: bytes | None, where: str = "") -> Manifest:
        """The manifest held in ``data`` (a manifest file's bytes; None: there is none, so it is empty). Bytes that
        are not a manifest, or hold a malformed entry, raise :class:`~rqvae_ray.errors.ManifestError` naming
        ``where`` (default: the manifest's path in ``folder``)."""
        manifest = cls(folder, dataset)
        if data is None:
            return manifest
        problem, entries = _entries(data)
        if problem:
            raise ManifestError(where or str(folder / MANIFEST_FILE), problem)
        for entry in entries:
            manifest.entries[entry.file] = entry
        return manifest

    def to_bytes(self) -> bytes:
        document = {
            "tool": "rqvae_ray",
            "dataset": self.dataset,
            "files": {name: asdict(entry) for name, entry in sorted(self.entries.items())},
        }
        return json.dumps(document, indent=2, sort_keys=True).encode()

    def write(self) -> Path:
        """Write the manifest atomically."""
        data = self.to_bytes()
        return atomic_write(self.folder / MANIFEST_FILE, lambda partial: partial.write_bytes(data))


def _entries(data: bytes) -> tuple[str, list[ManifestEntry]]:
    """The entries of a manifest file's bytes, or what makes them unreadable (then no entries)."""
    try:
        document = json.loads(data)
    except json.JSONDecodeError as exc:
        return f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", []
    except ValueError:  # bytes that are not UTF-8, -16 or -32 text
        return "it is not JSON text", []
    if not isinstance(document, dict):
        return f"it holds a JSON {type(document).__name__}, not an object", []
    # Manifests of rqvae_ray 0.1 keyed their entries by model ID; each entry names its file either way.
    key = "files" if "files" in document else "models"
    raw = document.get(key, {})
    if not isinstance(raw, dict):
        return f"its {key!r} is {_brief(raw)}, not an object", []
    entries = []
    for name, value in raw.items():
        problem = ManifestEntry.problem(value) if isinstance(value, dict) else "it is not an object"
        if problem:
            return f"entry {name!r}: {problem}", []
        entries.append(ManifestEntry.from_dict(value))
    return "", entries


def _on(value: bool) -> str:
    return "on" if value else "off"


def _cap(max_per_sid: int) -> str:
    return f"--max-per-sid {max_per_sid}" if max_per_sid else "no --max-per-sid"


def _brief(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool | None) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _is_name(value: object) -> bool:
    """A plain file name: no folder part, so that it stays in the manifest's folder."""
    return isinstance(value, str) and value not in ("", ".", "..") and not any(c in value for c in "/\\\0")


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _is_seconds(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= 0


def _is_export(value: object) -> bool:
    return (
        isinstance(value, dict)
        and _is_name(value.get("file"))
        and isinstance(value.get("kind"), str)
        and isinstance(value.get("sha256"), str)
    )


def _is_extended(value: object) -> bool:
    return value is None or (
        isinstance(value, dict) and isinstance(value.get("sha256"), str) and _is_count(value.get("rows"))
    )


_NAME_CHECK = ("a file name without a folder", _is_name)
# Per field annotation of ManifestEntry: what a valid JSON value is, in words and as a check.
_FIELD_CHECKS: dict[str, tuple[str, Callable[[object], bool]]] = {
    "str": ("a string", lambda value: isinstance(value, str)),
    "bool": ("true or false", lambda value: type(value) is bool),
    "int": ("a whole number >= 0", _is_count),
    "float": ("a number of seconds >= 0", _is_seconds),
    "dict": ("an object", lambda value: isinstance(value, dict)),
    "list[int]": ("a list of whole numbers >= 0", lambda value: isinstance(value, list) and all(map(_is_count, value))),
    "list[ExportRecord]": (
        "a list of {kind, file, sha256} objects",
        lambda value: isinstance(value, list) and all(map(_is_export, value)),
    ),
    "ExtendedFile | None": ("null or a {sha256, rows} object", _is_extended),
}


DAMAGED = "its bytes differ from the manifest's sha256 (damaged or edited)"


def damage(path: Path, entry: ManifestEntry) -> str:
    """Why ``path`` does not hold what its manifest entry records (its sha256 and its number of rows, so that a
    file cut short is caught even where its recorded sha256 was edited to match); "" when it does."""
    if sha256_files([path]) != entry.sha256:
        return DAMAGED
    rows = file_rows(path)
    if rows != entry.rows:
        held = "rows that cannot be counted" if rows is None else f"{rows} rows"
        return f"it holds {held} but the manifest records {entry.rows} (cut short or edited)"
    return ""


def intact(path: Path, entry: ManifestEntry) -> bool:
    """Whether ``path`` holds the bytes and the rows that its manifest entry records."""
    return not damage(path, entry)


def file_rows(path: Path) -> int | None:
    """The rows of a codebooks file: a Parquet file's (from its footer), else a CSV file's lines after the header;
    None when a Parquet file's footer cannot be read."""
    from rqvae_ray.outputs.readers import PARQUET_MAGIC

    with path.open("rb") as handle:
        if handle.read(4) == PARQUET_MAGIC:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                return pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowException):
                return None
        handle.seek(0)
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    return max(lines - 1, 0)  # every line, the header's too, ends with a newline


@dataclass(frozen=True)
class Existing:
    """What is already in the output folder for one model: ``entry`` when the file is up to date (skip it);
    otherwise ``stale`` says why an existing file will be replaced ("" when there is none)."""

    entry: ManifestEntry | None = None
    stale: str = ""


def check_existing(folder: Path, filename: str, spec: OutputSpec, provenance: Provenance, dataset: str) -> Existing:
    """Is ``folder/filename`` up to date: recorded in the manifest with the same inputs and options, and intact?"""
    path = folder / filename
    manifest = Manifest.read(folder, dataset)  # first: a manifest that cannot be read fails before any work
    if not path.is_file():
        return Existing()
    entry = manifest.entries.get(filename)
    if entry is None:
        return Existing(stale="the manifest does not describe it")
    why = entry.matches(spec, provenance) or damage(path, entry)
    if why:
        return Existing(stale=why)
    for record in entry.exports:
        exported = folder / record.file
        if not exported.is_file() or sha256_files([exported]) != record.sha256:
            return Existing(stale=f"its export {record.file} is missing or differs from the manifest's sha256")
    return Existing(entry=entry)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
