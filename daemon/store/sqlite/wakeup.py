"""SQLite: noticing that another program wrote the database, within milliseconds and without busy polling.

Every commit in WAL mode writes the `-wal` file, so inotify on the database's directory wakes us at once;
the caller confirms with `PRAGMA data_version`. Where inotify is unavailable we fall back to polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

from daemon.store.base import ChangeSource

_IN_MODIFY = 0x00000002
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


def _inotify_fd(directory: Path) -> int | None:
    """An inotify descriptor watching `directory`, or None where the platform denies it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fd = int(libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    except (OSError, AttributeError):
        return None
    if fd < 0:
        return None
    mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO
    if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        os.close(fd)
        return None
    return fd


class ChangeWatcher(ChangeSource):
    """Calls `on_change` (on the event loop) whenever the database files may have changed.

    Without inotify it never calls: the owner polls at `poll_interval_s()` instead.
    """

    FALLBACK_POLL_S = 0.05

    def __init__(self, db_path: Path, on_change: Callable[[], None]) -> None:
        self._names = {db_path.name.encode(), f"{db_path.name}-wal".encode()}
        self._on_change = on_change
        self._fd = _inotify_fd(db_path.parent)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def uses_push(self) -> bool:
        return self._fd is not None

    def poll_interval_s(self, configured_s: float) -> float:
        return configured_s if self._fd is not None else min(configured_s, self.FALLBACK_POLL_S)

    def start(self) -> None:
        if self._fd is not None and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        assert self._fd is not None
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        changed = False
        while offset < len(buf):
            _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
            name = buf[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            changed = changed or name in self._names
        if changed:
            self._on_change()

    def close(self) -> None:
        if self._fd is not None:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
