"""Comma-separated lists of named choices on the command line (``--export``, ``--for``)."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from rqvae_ray.errors import OutputError

Choice = TypeVar("Choice", bound=Enum)


def parse_choices(kind: type[Choice], text: str, option: str, noun: str) -> frozenset[Choice]:
    """The members of ``kind`` named in ``text`` (``"a, b,"``); an unknown name raises :class:`OutputError` naming
    ``option`` and the choices."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {member.value: member for member in kind}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise OutputError(f"{option} {unknown[0]!r} is not {noun}; choose from {', '.join(known)}")
    return frozenset(known[name] for name in names)
