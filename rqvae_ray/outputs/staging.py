"""Staged files: a file is written under a hidden partial name in the same directory (so that publishing is a
rename within one filesystem) and renamed into place only when complete; the hashing file every output is written
through; the one atomic write of the package; the folder lock under which runs sharing a folder merge its manifest
and report; and the cleanup of partial files whose writer died.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
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


# Output files go to the disk directly (O_DIRECT) where the filesystem allows, gathered here in aligned chunks: on
# this project's VM, copying 4 GB of CSV into the page cache cost the writing process 6-11 s of kernel CPU, written
# directly 0.3-0.4 s, and the disk took them over twice as fast. Chunks of 1 to 8 MiB wrote equally fast there; 4 MiB
# leaves room for disks with a longer latency per write, and is the memory each open output file holds.
DIRECT_CHUNK_BYTES = 4 << 20
# A multiple of every logical block size, with which O_DIRECT needs offsets, lengths and memory aligned.
DIRECT_ALIGN = 4096


class HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes passing through it, so that no output is ever read back to hash it.

    The bytes are gathered in a page-aligned chunk and written a chunk at a time, past the page cache (O_DIRECT)
    where the filesystem accepts it, through it otherwise; closing the file writes the last chunk (padded to the
    alignment, the file then cut to its length), and fsyncs it.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.digest = hashlib.sha256()
        self._position = 0
        self._fd, self.direct = open_for_writing(path)
        self._chunk = mmap.mmap(-1, DIRECT_CHUNK_BYTES)
        self._view = memoryview(self._chunk)
        self._filled = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        taken = 0
        while taken < len(view):
            size = min(DIRECT_CHUNK_BYTES - self._filled, len(view) - taken)
            self._view[self._filled : self._filled + size] = view[taken : taken + size]
            self._filled += size
            taken += size
            if self._filled == DIRECT_CHUNK_BYTES:
                self._write_chunk(DIRECT_CHUNK_BYTES)
                self._filled = 0
        self._position += taken
        return taken

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._filled:
                if self.direct:  # the last block padded to the alignment, then cut off
                    padded = direct_aligned(self._filled)
                    self._view[self._filled : padded] = bytes(padded - self._filled)
                    self._write_chunk(padded)
                    os.ftruncate(self._fd, self._position)
                else:
                    self._write_chunk(self._filled)
                self._filled = 0
            os.fsync(self._fd)
        finally:  # a failed write (a full disk) closes the file too, so that closing it again does nothing
            super().close()
            os.close(self._fd)
            self._view.release()
            self._chunk.close()

    def _write_chunk(self, size: int) -> None:
        written = 0
        while written < size:
            try:
                with self._view[written:size] as part:  # released even when the write fails
                    written += os.write(self._fd, part)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                # A filesystem that opened the file for O_DIRECT but refuses its writes: through the page cache.
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False


def direct_aligned(size: int) -> int:
    """``size`` rounded up to :data:`DIRECT_ALIGN`, as a write past the page cache needs."""
    return -(-size // DIRECT_ALIGN) * DIRECT_ALIGN


def open_for_writing(path: Path, direct: bool = True) -> tuple[int, bool]:
    """A new file at ``path`` (truncated) opened past the page cache (O_DIRECT) where ``direct`` and the filesystem
    allow it, and whether it is."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    o_direct = getattr(os, "O_DIRECT", 0) if direct else 0
    if o_direct:
        try:
            return os.open(path, flags | o_direct, 0o666), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this filesystem has no O_DIRECT
                raise
    return os.open(path, flags, 0o666), False


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
