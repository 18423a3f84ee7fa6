"""Facts about processes on this host from /proc, and killing a job's process group without hitting a stranger.

A pid is only an identity together with its start time and the host's boot: pids are reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_PR_SET_DUMPABLE = 4


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat this daemon uses."""

    state: str
    ppid: int
    pgrp: int
    session: int
    start_time: int  # clock ticks after boot


def boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def stat(pid: int) -> Stat | None:
    """/proc/PID/stat, or None if there is no such process."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    return Stat(fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such process."""
    found = stat(pid)
    return found.start_time if found is not None else None


def is_alive(pid: int, started: int | None) -> bool:
    """Is the process `pid` that started at `started` still there (not a reuse of its pid)?"""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def kill_group(pgid: int, started: int | None) -> bool:
    """SIGKILL the process group `pgid` if it is still the job's; True if a signal was sent.

    If a process `pgid` exists it must be the job's leader (same start time). If it does not, any process still
    in group `pgid` is the job's: Linux does not reuse a pid while a process group of that id exists. Never a
    pgid of 1 or less: 0 is the caller's own group, 1 init's.
    """
    if pgid <= 1:
        return False
    leader = start_time(pgid)
    if leader is not None and started is not None and leader != started:
        return False  # the pid now belongs to someone else
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
        return True
    return False


def kill_session_group(pid: int, not_before: int | None) -> bool:
    """SIGKILL the group of a job that leads a session of its own (as the keeper starts every job), if `pid` is
    one: group and session `pid`, started no earlier than `not_before` (the keeper's start). Its leader, or once
    the leader is gone a member left in its group, must show it: a pid someone merely claims is never signalled."""
    if pid <= 1:
        return False
    found = stat(pid)
    if found is None or found.state == "Z":  # the leader is gone: a member must show the job's session
        found = next((s for s in map(stat, _pids()) if s is not None and s.pgrp == pid and s.state != "Z"), None)
    if found is None or found.pgrp != pid or found.session != pid:
        return False
    if not_before is not None and found.start_time < not_before:
        return False
    return kill_group(pid, None)


def _pids() -> list[int]:
    return [int(entry.name) for entry in _PROC.iterdir() if entry.name.isdigit()]


def make_undumpable() -> bool:
    """PR_SET_DUMPABLE 0: processes of this user (the jobs) can no longer read this one's /proc/PID/environ or
    memory, nor attach a debugger; no core dump. An exec (every job's) makes the new program dumpable again."""
    with contextlib.suppress(OSError, AttributeError):
        return bool(ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
    return False
