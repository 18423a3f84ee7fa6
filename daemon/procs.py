"""Facts about processes on this host from /proc, and killing a job's process group without hitting a stranger.

A pid is only an identity together with its start time and the host's boot: pids are reused.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such process."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def is_alive(pid: int, started: int | None) -> bool:
    """Is the process `pid` that started at `started` still there (not a reuse of its pid)?"""
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def kill_group(pgid: int, started: int | None) -> bool:
    """SIGKILL the process group `pgid` if it is still the job's; True if a signal was sent.

    If a process `pgid` exists it must be the job's leader (same start time). If it does not, any process still
    in group `pgid` is the job's: Linux does not reuse a pid while a process group of that id exists.
    """
    leader = start_time(pgid)
    if leader is not None and started is not None and leader != started:
        return False  # the pid now belongs to someone else
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
        return True
    return False
