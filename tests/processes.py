"""The processes a test's own run started: its process group's live members, and a process's descendants."""

from __future__ import annotations

import os
import time

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


def group_empty_within(pgid: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for process group ``pgid`` to have no live member; whether it came to none."""
    deadline = time.monotonic() + seconds
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def descendants_running(root_pid: int, marker: str) -> list[psutil.Process]:
    """Live descendants of ``root_pid`` whose command line contains ``marker`` (zombies and vanished ones skipped):
    a test's own Ray's processes, never another Ray's on the machine."""
    found = []
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return found
    for process in children:
        try:
            if process.status() != psutil.STATUS_ZOMBIE and marker in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def kill_first(processes: list[psutil.Process]) -> int | None:
    """Kill the first of ``processes`` still there to kill; its pid, or None when none was."""
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            continue
        return process.pid
    return None
