"""Whether POSIX advisory locks, what SQLite's own locking is made of, hold between processes on a filesystem: a
second process takes one, and this one must then be refused it. Android's shared storage (/sdcard, a FUSE mount)
and some network filesystems grant every lock and tell no one else: two writers then corrupt the database. The
check is a real lock, never a guess from the path."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE_PREFIX = ".nexus-jobd-lockcheck-"
TIMEOUT_S = 10.0
# The second process: it takes a write lock on the probe's first byte as SQLite takes its locks (fcntl F_SETLK),
# says so, and holds it until its stdin closes.
_HOLDER = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError as e:
        print("refused", e.errno, e.strerror, flush=True)
    else:
        print("locked", flush=True)
    sys.stdin.read()
"""


class Unchecked(Exception):
    """The check could not be made (no probe file could be created there, no second process started): not an
    answer either way."""


def problem(path: Path) -> str | None:
    """Why SQLite's locking cannot be trusted on the filesystem that holds `path` (a database, which may not exist
    yet: the nearest directory that does is where it will be), or None when a second process's lock holds here.
    Raises Unchecked when it cannot tell."""
    directory = Path(os.path.realpath(path)).parent
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=directory)
    except OSError as e:
        if e.errno == errno.EROFS:
            return None  # nothing can write there, so no lock can fail a writer: the read-only refusal says so
        raise Unchecked(f"no file can be created in {directory} to try a lock: {e.strerror or e}") from e
    try:
        return _tried(fd, probe)
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _tried(fd: int, probe: str) -> str | None:
    try:
        holder = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HOLDER, probe], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
    except OSError as e:
        raise Unchecked(f"no second process could be started to hold a lock: {e}") from e
    assert holder.stdin is not None and holder.stdout is not None
    try:
        ready, _, _ = select.select([holder.stdout], [], [], TIMEOUT_S)
        said = holder.stdout.readline().decode(errors="replace").split(maxsplit=2) if ready else []
        if not ready:
            raise Unchecked(f"the second process did not say within {TIMEOUT_S:g} s whether it got the lock")
        if not said:
            raise Unchecked("the second process exited before it said whether it got the lock")
        if said[0] == "refused":
            return f"a process cannot take a lock there ({said[-1].strip()}, errno {said[1]})"
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None  # refused while the other process holds it: locks are shared, as SQLite needs
            return f"a process cannot take a lock there ({e.strerror}, errno {e.errno})"
        return ("a lock another process held on a file there was granted to this one too: the filesystem does not "
                "share locks between processes")
    finally:
        holder.stdin.close()
        try:
            holder.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
