"""The one sha256 helper of the package: the digest of files' bytes, read in chunks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_files(paths: Iterable[Path]) -> str:
    """The sha256 of the concatenated bytes of ``paths``, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
