"""SQLite: noticing that another program wrote the database, within milliseconds and without busy polling.

Every commit in WAL mode writes the `-wal` file, so inotify on the database's directory wakes us at once; we confirm
with `PRAGMA data_version` (and look again a few times: see QueueChanges). Where inotify is unavailable we poll.
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
from typing import Protocol

from daemon import ticks
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


class FileWatcher:
    """Calls `on_change` (on the event loop) whenever the database files may have changed; without inotify, never
    (`watching` is False: the owner polls)."""

    def __init__(self, db_path: Path, on_change: Callable[[], None]) -> None:
        self._names = {db_path.name.encode(), f"{db_path.name}-wal".encode()}
        self._on_change = on_change
        self._fd = _inotify_fd(db_path.parent)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def watching(self) -> bool:
        return self._fd is not None

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


class Probe(Protocol):
    """What QueueChanges asks of the SQLite driver."""

    def check_rewritten(self) -> str | None: ...

    def anyone_committed(self) -> bool: ...

    def wrote_just_now(self, within_s: float = 0.01) -> bool: ...

    async def data_version(self) -> int: ...


# After a notification, look again 1, 2, 4 ... 256 ms later, then every 256 ms: about 2 s in all, for a writer whose
# fsync between the -wal write and the commit is slow (SD cards, phones).
RECHECK_DOUBLINGS = 8
RECHECKS = 15
OWN_COMMIT_RECHECKS = 6  # 1, 2, 4 ... 32 ms: about 60 ms, a phone's fsync
FALLBACK_POLL_S = 0.05  # without inotify


class _Watched(ChangeSource):
    """What both change sources share: inotify on the database's directory (a poll without it), one task that looks,
    and the looks after a notification, 1, 2, 4 ... ms apart (capped at 2**RECHECK_DOUBLINGS), as many as a
    notification leaves in `_rechecks`."""

    _task_name = "sqlite"

    def __init__(self, probe: Probe, path: Path, on_change: Callable[[], None], poll_s: float) -> None:
        self._probe, self._on_change = probe, on_change
        self._files = FileWatcher(path, self._notified)
        self._poll_s = poll_s if self._files.watching else min(poll_s, FALLBACK_POLL_S)
        self._wake = asyncio.Event()
        self._rechecks = 0  # looks left after a notification
        self._step = 0  # the next look comes 2**step ms later (capped at RECHECK_DOUBLINGS)
        self._task: asyncio.Task[None] | None = None

    @property
    def uses_push(self) -> bool:
        return self._files.watching

    def start(self) -> None:
        if self._task is None:
            self._files.start()
            self._started()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._task_name)

    def close(self) -> None:
        self._files.close()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _started(self) -> None:
        """Before the first look."""

    def _notified(self) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        raise NotImplementedError

    def _recheck_in(self) -> float | None:
        return 0.001 * float(2 ** min(RECHECK_DOUBLINGS, self._step)) if self._rechecks else None

    async def _wait(self, delay: float, timed_out: Callable[[], None]) -> None:
        """Until a notification, or `delay` seconds (then `timed_out` is called first)."""
        handle = asyncio.get_running_loop().call_later(delay, timed_out)
        try:
            await self._wake.wait()
        finally:
            handle.cancel()
            self._wake.clear()


class QueueChanges(_Watched):
    """Tells the daemon when another program committed, or rewrote the file. Each look costs the cheap in-thread
    probe; only a commit it saw costs a round trip for the connection's data_version, which does not count our own.

    The -wal write that inotify reports comes just before the commit is published in the shared-memory index (after
    the writer's fsync, which can take tens of ms on phone or SD storage), so data_version may not have moved yet:
    it looks again, RECHECKS times, doubling the pause. A write that is most likely our own (the lease heartbeat, an
    output flush) gets a few looks only, for another program's commit landing with it."""

    _task_name = "sqlite changes"

    def __init__(self, probe: Probe, path: Path, on_change: Callable[[], None], poll_s: float) -> None:
        super().__init__(probe, path, on_change, poll_s)
        self._version: int | None = None

    def _notified(self) -> None:
        if not self._probe.wrote_just_now():
            self._rechecks, self._step = RECHECKS, 0
        elif self._rechecks < OWN_COMMIT_RECHECKS:  # never cutting short the looks for a commit before ours
            self._rechecks, self._step = OWN_COMMIT_RECHECKS, 0
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._look()
            recheck = self._recheck_in()  # else the safety poll, which wakes with the lease and the heartbeats
            await self._wait(ticks.until_next(self._poll_s) if recheck is None else recheck, self._timed_out)

    def _timed_out(self) -> None:
        self._rechecks = max(0, self._rechecks - 1)
        self._step += 1
        self._wake.set()

    async def _look(self) -> None:
        if self._probe.check_rewritten() is not None:
            self._on_change()  # the daemon finds `unwritable` set; nothing more to look at
            self._rechecks = 0
            return
        if not self._probe.anyone_committed():
            return
        try:
            version = await self._probe.data_version()
        except Exception:  # the database is away (locked past its timeout, I/O): the next look tries again
            self._on_change()
            return
        if version != self._version:
            self._version = version
            self._rechecks = 0  # what the notification announced is visible now
            self._on_change()


class RowChanges(_Watched):
    """Every commit by anyone (the web console follows output and heartbeats, not only the queue): a call at once
    for each -wal write inotify reports, then as the commit lands (the probe, at doubling pauses, RECHECKS times),
    then, without inotify, a poll."""

    _task_name = "sqlite rows"

    def _started(self) -> None:
        self._probe.anyone_committed()  # the probe's baseline

    def _notified(self) -> None:
        self._rechecks, self._step = RECHECKS, 0
        self._probe.anyone_committed()  # a look now; the rechecks then see the commit land
        self._on_change()

    async def _run(self) -> None:
        while True:
            recheck = self._recheck_in()
            await self._wait(self._poll_s if recheck is None else recheck, self._wake.set)
            if self._rechecks:
                self._rechecks, self._step = self._rechecks - 1, self._step + 1
            if self._probe.anyone_committed():
                self._on_change()
