"""The hashing file every output is written through: the same bytes and digest whatever the writes' sizes, past the
page cache (O_DIRECT) where the filesystem takes it, through it where it refuses at open or at the first write."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import random

import pytest

from rqvae_ray.outputs import staging
from rqvae_ray.outputs.staging import DIRECT_ALIGN, DIRECT_CHUNK_BYTES, HashingFile

CHUNK = DIRECT_CHUNK_BYTES
WRITES = [
    [],
    [b""],
    [b"x"],
    [DIRECT_ALIGN - 1],
    [DIRECT_ALIGN],
    [DIRECT_ALIGN + 1],
    [CHUNK - 1],
    [CHUNK],
    [CHUNK + 1],
    [3, CHUNK, 5000, 2 * CHUNK + 7, 1],
    [CHUNK - 10, 20, CHUNK - 10],
]


def _parts(sizes: list) -> list[bytes]:
    rng = random.Random(len(sizes))
    return [s if isinstance(s, bytes) else rng.randbytes(s) for s in sizes]


def _write(path, parts: list[bytes]) -> HashingFile:
    handle = HashingFile(path)
    for part in parts:
        assert handle.write(part) == len(part)
    assert handle.tell() == sum(map(len, parts))
    handle.close()
    return handle


def _refusing_direct_writes(monkeypatch) -> None:
    """A filesystem that opens files for O_DIRECT but refuses their writes."""
    write = os.write

    def refusing(fd: int, data) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return write(fd, data)

    monkeypatch.setattr(staging.os, "write", refusing)


def _without_direct(monkeypatch) -> None:
    """A filesystem without O_DIRECT: opening with it fails with EINVAL."""
    open_ = os.open

    def refusing(path, flags, mode=0o777):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return open_(path, flags, mode)

    monkeypatch.setattr(staging.os, "open", refusing)


@pytest.mark.parametrize("filesystem", ["this", "without O_DIRECT", "refusing direct writes"])
@pytest.mark.parametrize(
    "sizes", WRITES, ids=lambda sizes: "+".join(str(s if isinstance(s, int) else len(s)) for s in sizes) or "none"
)
def test_the_file_holds_exactly_the_bytes_written_and_their_sha256(tmp_path, monkeypatch, filesystem, sizes):
    if filesystem == "without O_DIRECT":
        _without_direct(monkeypatch)
    elif filesystem == "refusing direct writes":
        _refusing_direct_writes(monkeypatch)
    parts = _parts(sizes)
    handle = _write(tmp_path / "out.bin", [*parts, bytearray(b"tail"), memoryview(b"!")])
    data = b"".join(parts) + b"tail!"
    assert (tmp_path / "out.bin").read_bytes() == data
    assert handle.digest.hexdigest() == hashlib.sha256(data).hexdigest()
    if filesystem == "without O_DIRECT":
        assert not handle.direct
    if filesystem == "refusing direct writes" and len(data) > 0:
        assert not handle.direct  # it was, until the first write was refused


def test_it_writes_past_the_page_cache_exactly_when_it_says_so(tmp_path):
    handle = HashingFile(tmp_path / "out.bin")
    try:
        assert bool(fcntl.fcntl(handle._fd, fcntl.F_GETFL) & os.O_DIRECT) == handle.direct
    finally:
        handle.close()


def test_a_failed_last_write_closes_the_file(tmp_path, monkeypatch):
    handle = HashingFile(tmp_path / "out.bin")
    handle.write(b"rows")

    def full(fd: int, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(staging.os, "write", full)
    with pytest.raises(OSError) as failed:
        handle.close()
    assert failed.value.errno == errno.ENOSPC
    assert handle.closed
    handle.close()  # closing again does nothing
    assert not [fd for fd in os.listdir("/proc/self/fd") if _points_to(fd, tmp_path / "out.bin")]


def _points_to(fd: str, path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == str(path)
    except OSError:  # the descriptor listing the folder is gone by now
        return False
