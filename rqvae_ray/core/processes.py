"""What Linux's /proc says of this host's processes: the one reader of ``/proc/<pid>/stat``."""

from __future__ import annotations

import os
from pathlib import Path


def stat_field(pid: int, index: int) -> str | None:
    """Field ``index`` (0-based, as in proc(5) minus one: 2 the state, 3 the parent, 21 the start time) of
    ``/proc/<pid>/stat``; None when there is no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 1) is in parentheses and may itself hold spaces or parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[index - 2] if len(fields) > index - 2 else None


def process_ids() -> list[int]:
    """Every process id /proc lists (none without /proc)."""
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
