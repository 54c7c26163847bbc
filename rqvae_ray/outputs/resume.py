"""Resume state: the journal of every file's SIDs written so far, and how many of its rows are safe on disk, so
that an interrupted run is continued by the next run with the same inputs and options.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rqvae_ray import __version__
from rqvae_ray.core.contract import OutputSpec
from rqvae_ray.outputs.manifest import Provenance
from rqvae_ray.outputs.staging import atomic_write, owner_gone

JOURNAL_ROW_BYTES = 8  # a little-endian int64 word; a journal row has one per word of a packed SID (most: one)


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
    options = {
        **asdict(spec),
        "fmt": spec.fmt.value,
        "exports": sorted(e.value for e in spec.exports),
        "presets": sorted(p.value for p in spec.presets),
    }
    document = {"model_id": model_id, "file": filename, **asdict(provenance), "spec": options, "pois": num_pois}
    document["tool_version"] = __version__
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def remove_resume_state(final: Path) -> None:
    for path in (resume_state_path(final), journal_path(final)):
        path.unlink(missing_ok=True)
