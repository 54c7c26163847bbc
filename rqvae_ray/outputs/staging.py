"""Staged files: a file is written under a hidden partial name in the same directory (so that publishing is a
rename within one filesystem) and renamed into place only when complete; the hashing file every output is written
through; the one atomic write of the package; the folder lock under which runs sharing a folder merge its manifest
and report; and the cleanup of partial files whose writer died.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from rqvae_ray.core.processes import stat_field

PARTIAL_SUFFIX = ".partial"


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
        if self.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:  # a failed flush (a full disk) closes the file too, so that closing it again does nothing
            super().close()
            self._file.close()


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
    return _zombie(int(pid))


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but is not yet reaped by its parent (signal 0 still reaches such a process)."""
    state = stat_field(pid, 2)
    if state is None:  # reaped meanwhile (gone), or no /proc to tell (taken as alive, as signal 0 said)
        return Path("/proc/self").exists()
    return state == "Z"
