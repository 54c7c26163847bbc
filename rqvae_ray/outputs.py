"""Where outputs go and what is known about them: paths, file names, staged (partial) files, the manifest, and the
up-to-date check; with the one sha256 helper, the hashing file, the one atomic write of the package and the folder
lock under which runs sharing a folder merge its manifest and report.

Layout: ``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files/codebooks-<model>.<csv|parquet>`` (and
the files exported beside it, ``codebooks-<model>.<index.json|sids.pt|prefixes.json>``) beside
``rqvae_ray-manifest.json``, which holds one :class:`ManifestEntry` per codebooks file (its exports listed on it).
A file is written under a hidden partial name in the same directory (so that publishing is a rename within one
filesystem) and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.contract import Export, OutputFormat, OutputSpec

MANIFEST_FILE = "rqvae_ray-manifest.json"
PARTIAL_SUFFIX = ".partial"
JOURNAL_ROW_BYTES = 8  # one packed SID per row of a resume journal, a little-endian int64


def output_dir(root: Path, repo: str, base_folder: str) -> Path:
    """``<root>/datasets/<org>/<dataset>/<base folder>/Intermediate Files``."""
    return root / "datasets" / repo / repo_folder(base_folder)


def repo_folder(base_folder: str) -> str:
    """Where the outputs live inside a dataset repo: ``<base folder>/Intermediate Files``."""
    return f"{base_folder}/Intermediate Files"


def codebooks_filename(model_name: str, fmt: OutputFormat) -> str:
    """``codebooks-<model name>.<csv|parquet>``."""
    return f"codebooks-{model_name}.{fmt.extension}"


def export_filename(codebooks_file: str, export: Export) -> str:
    """``codebooks-<model>.<suffix>`` of an export of ``codebooks-<model>.<csv|parquet>``."""
    return f"{codebooks_file.rsplit('.', 1)[0]}.{export.suffix}"


def sha256_files(paths: Iterable[Path]) -> str:
    """The sha256 of the concatenated bytes of ``paths``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def partial_path(final: Path, kind: str = "") -> Path:
    """A hidden name beside ``final`` for writing it: ``.<name>[.<kind>].<host>-<pid>-<random>.partial``.

    The host and process id let a later run on this host tell a partial file whose writer died from one still being
    written (:func:`remove_stale_partials`).
    """
    tag = f"{owner_tag()}-{uuid.uuid4().hex[:12]}"
    return final.with_name(f".{final.name}{'.' + kind if kind else ''}.{tag}{PARTIAL_SUFFIX}")


def remove_stale_partials(folder: Path) -> list[Path]:
    """Delete the partial files in ``folder`` whose writer (a process on this host) no longer runs."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    # This host's partial files: the host name may hold dots and dashes, so it is matched, not split off.
    ours = re.compile(rf"\..+\.{re.escape(socket.gethostname())}-(\d+)-[^.]+{re.escape(PARTIAL_SUFFIX)}")
    for path in folder.glob(f".*{PARTIAL_SUFFIX}"):
        match = ours.fullmatch(path.name)
        if match and owner_gone(f"{socket.gethostname()}-{match.group(1)}"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write(partial)`` and rename it into place; no partial file stays behind."""
    partial = partial_path(path)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        with contextlib.suppress(OSError):  # gone after os.replace; unreachable when the folder is
            partial.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while a file that several runs into it share (the manifest, the quality
    report) is read, merged and written, so that runs finishing at the same time keep each other's entries.

    The lock is taken on the directory itself, so no lock file appears among the outputs; it ends with the block or
    with the process. Where the filesystem cannot lock a directory (some network filesystems), the block runs
    unlocked.
    """
    handle = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


class HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes passing through it, so that no output is ever read back to hash it;
    closing it flushes and fsyncs."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._file = path.open("wb")
        self.digest = hashlib.sha256()
        self._position = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        written = self._file.write(data)
        self._position += written
        return written

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        super().close()


def journal_path(final: Path) -> Path:
    """Where a run keeps the SIDs it has written to ``final`` so far (resume state): ``.<name>.resume``."""
    return final.with_name(f".{final.name}.resume")


def resume_state_path(final: Path) -> Path:
    """The resume state of ``final``: ``.<name>.resume.json``, how many rows of the journal are safe."""
    return final.with_name(f".{final.name}.resume.json")


@dataclass(frozen=True)
class ResumeState:
    """How far an interrupted run got with one file: ``rows`` SIDs of its journal (the file with inode
    ``journal_inode``) are on disk, made for ``key`` (the inputs and options, see :func:`resume_key`), by the
    process ``owner`` (``host-pid``)."""

    key: str
    rows: int
    encode_seconds: float
    owner: str
    journal_inode: int

    @classmethod
    def read(cls, final: Path) -> ResumeState | None:
        """The resume state of ``final``; None when there is none or it is unreadable, and when the journal at its
        path is not the one the state was made with or holds fewer rows (a run writing the same file at the same
        time replaced it, or it was cut): its rows would then not be the SIDs the state was made for."""
        try:
            data = json.loads(resume_state_path(final).read_text())
            state = cls(
                str(data["key"]),
                int(data["rows"]),
                float(data["encode_seconds"]),
                str(data["owner"]),
                int(data["journal_inode"]),
            )
            journal = journal_path(final).stat()
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if journal.st_ino != state.journal_inode or journal.st_size < state.rows * JOURNAL_ROW_BYTES:
            return None
        return state

    def write(self, final: Path) -> None:
        data = json.dumps(asdict(self)).encode()
        atomic_write(resume_state_path(final), lambda partial: partial.write_bytes(data))

    @property
    def owner_alive(self) -> bool:
        """Whether the process that wrote it may still run (another host's is taken as alive)."""
        return not owner_gone(self.owner)


def resume_key(model_id: str, filename: str, provenance: Provenance, spec: OutputSpec, num_pois: int) -> str:
    """What a file's resume state must have been made for, to be resumed: the same model, inputs and options."""
    options = {**asdict(spec), "fmt": spec.fmt.value, "exports": sorted(e.value for e in spec.exports)}
    document = {"model_id": model_id, "file": filename, **asdict(provenance), "spec": options, "pois": num_pois}
    document["tool_version"] = __version__
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def owner_tag() -> str:
    """``<host>-<pid>`` of this process: how partial files and resume state name their writer."""
    return f"{socket.gethostname()}-{os.getpid()}"


def owner_gone(owner: str) -> bool:
    """Whether the writer ``owner`` (an :func:`owner_tag`) is known to have ended: it ran on this host and runs no
    more. Another host's writer, or one this process may not signal, is taken as alive."""
    host, _, pid = owner.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_resume_state(final: Path) -> None:
    for path in (resume_state_path(final), journal_path(final)):
        path.unlink(missing_ok=True)


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

    ``features_rows_sha256`` is :func:`rqvae_ray.feature_digest.rows_digests` of its rows 1..N (the features of
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

    @classmethod
    def from_dict(cls, data: dict) -> ManifestEntry | None:
        """An entry from its JSON form; None when it lacks the fields every entry has or has malformed ones."""
        known = {f.name for f in fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        try:
            values["exports"] = [ExportRecord(**record) for record in values.get("exports", [])]
            if values.get("extends") is not None:
                values["extends"] = ExtendedFile(**values["extends"])
            return cls(**values)
        except TypeError:
            return None

    def changed_options(self, spec: OutputSpec) -> list[tuple[str, bool]]:
        """The options that change a file's content and that ``spec`` sets otherwise: (flag, on in this file)."""
        options = (
            ("--dedup", self.dedup, spec.dedup),
            ("--fixed-length", self.fixed_length, spec.fixed_length),
            ("--sid-tokens", self.sid_tokens, spec.sid_tokens),
        )
        return [(flag, had) for flag, had, wanted in options if had != wanted]

    def matches(self, spec: OutputSpec, provenance: Provenance) -> str:
        """Why this file does not hold what ``spec`` and ``provenance`` ask for; "" when it does."""
        changed = [name for name, value in asdict(provenance).items() if getattr(self, name) != value]
        if changed:
            return "its inputs changed (" + ", ".join(sorted(changed)) + ")"
        options = [f"{flag} {'off' if had else 'on'}" for flag, had in self.changed_options(spec)]
        if options:
            return "it was written with other options (now " + ", ".join(options) + ")"
        wanted_exports = [export.value for export in spec.exported]
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
        """The manifest in ``folder``; empty when it is absent or unreadable (the outputs are then redone)."""
        try:
            data = (folder / MANIFEST_FILE).read_bytes()
        except OSError:
            data = None
        return cls.parse(folder, dataset, data)

    @classmethod
    def parse(cls, folder: Path, dataset: str, data: bytes | None) -> Manifest:
        """The manifest held in ``data`` (a manifest file's bytes); empty when None or unreadable."""
        manifest = cls(folder, dataset)
        try:
            document = json.loads(data) if data is not None else None
        except ValueError:
            return manifest
        if not isinstance(document, dict):
            return manifest
        # Manifests of rqvae_ray 0.1 keyed their entries by model ID; each entry names its file either way.
        raw = document.get("files") if isinstance(document.get("files"), dict) else document.get("models")
        for value in (raw or {}).values():
            entry = ManifestEntry.from_dict(value) if isinstance(value, dict) else None
            if entry is not None:
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


DAMAGED = "its bytes differ from the manifest's sha256 (damaged or edited)"


def intact(path: Path, entry: ManifestEntry) -> bool:
    """Whether ``path`` holds the bytes that its manifest entry records."""
    return sha256_files([path]) == entry.sha256


@dataclass(frozen=True)
class Existing:
    """What is already in the output folder for one model: ``entry`` when the file is up to date (skip it);
    otherwise ``stale`` says why an existing file will be replaced ("" when there is none)."""

    entry: ManifestEntry | None = None
    stale: str = ""


def check_existing(folder: Path, filename: str, spec: OutputSpec, provenance: Provenance, dataset: str) -> Existing:
    """Is ``folder/filename`` up to date: recorded in the manifest with the same inputs and options, and intact?"""
    path = folder / filename
    if not path.is_file():
        return Existing()
    entry = Manifest.read(folder, dataset).entries.get(filename)
    if entry is None:
        return Existing(stale="the manifest does not describe it")
    why = entry.matches(spec, provenance)
    if why:
        return Existing(stale=why)
    if not intact(path, entry):
        return Existing(stale=DAMAGED)
    for record in entry.exports:
        exported = folder / record.file
        if not exported.is_file() or sha256_files([exported]) != record.sha256:
            return Existing(stale=f"its export {record.file} is missing or differs from the manifest's sha256")
    return Existing(entry=entry)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
