"""The processes a test's own run started: its process group's live members."""

from __future__ import annotations

import os

import psutil


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes (zombies aside) of process group ``pgid``."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members
