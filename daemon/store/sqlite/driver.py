"""The SQLite driver (the embedded default): one aiosqlite connection running queries.sql's named statements, one
write at a time; and what only a SQLite file has: WAL checkpoints the daemon makes itself once it checked the file,
the rewrite guard and quarantine, data_version for the change source, and memory given back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from daemon import logging as log
from daemon.errors import DatabaseRewritten, JobdError
from daemon.model import Claim, Quarantine, now_ms
from daemon.store.base import DbRejected
from daemon.store.driver import Driver, Params, Rows, Tx
from daemon.store.sqlite import guard, rewrites, schema
from daemon.store.sqlite.queries import Q
from daemon.store.sqlite.setaside import Unsaved, apply_pending
from daemon.store.sqlite.wakeup import QueueChanges, RowChanges

T = TypeVar("T")
CHECKPOINT_FRAMES = 1000  # SQLite's own wal_autocheckpoint default, done by the daemon after checking the file
_LOCK_RETRY_S = 0.05
_LOCK_RETRY_MAX_S = 2.0
# SQLite keeps its own copy of each statement's last bound text until the statement is bound again (Python never
# clears bindings): a finish that bound output this long binds its statements to NULLs before it commits.
_BIG_TEXT = 256 * 1024

logger = log.get("store")


def _rows(rows: Iterable[sqlite3.Row]) -> Rows:
    """sqlite3.Row knows its columns' names: asked of the first row, once a statement."""
    found = rows if isinstance(rows, list) else list(rows)
    return Rows(found, tuple(found[0].keys()) if found else ())


class _Statements(Tx):
    """The named statements on the connection: the driver's reads, and its transactions' statements once the
    transaction began."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def rows(self, query: str, params: Params | None = None) -> Rows:
        return _rows(await self._conn.execute_fetchall(Q[query], params))

    async def execute(self, query: str, params: Params | None = None) -> None:
        await self._conn.execute(Q[query], params)

    async def executemany(self, query: str, params: Sequence[Params]) -> None:
        if params:
            await self._conn.executemany(Q[query], params)


class SqliteDriver(Driver):
    """One aiosqlite connection. In autocommit mode every named statement is its own atomic transaction."""

    path: Path

    def __init__(self, conn: aiosqlite.Connection, path: Path, *, daemon: bool = False,
                 rewrite_guard: guard.RewriteGuard | None = None) -> None:
        self._conn = conn
        self._statements = _Statements(conn)
        self.path = path
        self.name = str(path)
        self._daemon = daemon  # the daemon checkpoints by itself (after checking the file), not at each commit
        self._guard = rewrite_guard  # while the file is ours in WAL mode
        self._probe: sqlite3.Connection | None = None
        self._probe_version: int | None = None
        # Writes take this lock in the order their data was rendered, so a transaction of several statements
        # never interleaves with another write and an older output snapshot never lands after a newer one.
        self._write_lock = asyncio.Lock()
        self._writing = False
        self._wrote_at = -math.inf  # monotonic time our last write ended
        self._rewritten: str | None = None  # why the file is no longer ours: from then on nothing is written
        self._closed = False
        self._pending_frames: int | None = None  # WAL frames not yet in the main file, after our last write
        self._unsaved = Unsaved(path)

    async def close(self) -> None:
        """Copy the WAL into the main file first, if the file is still ours; SQLite's own checkpoint on close is
        off (guard.no_checkpoint_on_close), since it cannot know."""
        if self._closed:
            return
        if self._guard is not None and self.check_rewritten() is None:
            # An empty WAL: nothing another program could replay onto the file once a whole-file writer rewrites
            # it. Never holding a stop up behind another's reader: then the WAL is the daemon's, to empty later.
            with contextlib.suppress(sqlite3.Error):
                await self._conn.execute("PRAGMA busy_timeout = 200")
                await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        elif self._guard is not None and self._unsaved.kept is None:  # rewritten under a command: writes go aside
            with contextlib.suppress(OSError):
                await self.quarantine(running=[], worker={})
        self._closed = True
        if self._probe is not None:
            self._probe.close()
        await self._conn.close()
        if self._guard is not None:
            self._guard.close()  # last: closing its descriptors would drop SQLite's locks

    # -- the primitives ---------------------------------------------------------------------------------------

    async def read(self, query: str, params: Params | None = None) -> Rows:
        return await self._statements.rows(query, params)

    async def write(self, query: str, params: Params | None = None) -> Rows:
        async with self._writer():
            return await self._retry_locked(partial(self._statements.rows, query, params))

    async def write_count(self, query: str, params: Params) -> int:
        async def op() -> int:
            cursor = await self._conn.execute(Q[query], params)
            return int(cursor.rowcount)

        async with self._writer():
            return await self._retry_locked(op)

    async def transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run `work` inside BEGIN IMMEDIATE ... COMMIT, retrying while another process holds the lock."""

        async def attempt() -> T:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                if self.check_rewritten() is not None:  # it may have come while we waited for the lock
                    raise DatabaseRewritten(f"{self.path}: {self._rewritten}; nothing more is written to it")
                result = await work(self._statements)
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")
            return result

        async with self._writer():
            return await self._retry_locked(attempt)

    @contextlib.asynccontextmanager
    async def _writer(self) -> AsyncIterator[None]:
        """One write at a time, and when it happened: what tells our own commits from other programs'."""
        async with self._write_lock:
            if self.check_rewritten() is not None:
                raise DatabaseRewritten(f"{self.path}: {self._rewritten}; nothing more is written to it")
            self._writing = True
            try:
                yield
                await self._checkpoint_if_due()
            except (OverflowError, sqlite3.DataError, sqlite3.IntegrityError) as e:  # rolled back already
                raise DbRejected(f"{self.path}: the database refused the values: {e}") from e
            except sqlite3.Error as e:
                if self.check_rewritten() is not None:  # "malformed": pages of the other program's file
                    raise DatabaseRewritten(f"{self.path}: {self._rewritten}; nothing more is written to it") from e
                raise
            finally:
                self._writing = False
                self._wrote_at = time.monotonic()

    async def _retry_locked(self, op: Callable[[], Awaitable[T]]) -> T:
        """The busy timeout already waited; past it, keep retrying: a write we drop would lose a job's state."""
        delay = _LOCK_RETRY_S
        while True:
            try:
                return await op()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise
                logger.warning("db.locked", db=str(self.path), retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _LOCK_RETRY_MAX_S)

    # -- binding ------------------------------------------------------------------------------------------

    def array(self, items: Iterable[Any]) -> str:
        return json.dumps(list(items))  # read by json_each()

    def claims(self, claims: Sequence[Claim]) -> dict[str, Any]:
        return {"claims": json.dumps([[claim.job_id, claim.attempt] for claim in claims])}

    # -- what the store's writes leave: unsaved jobs and results, SQLite's copies of big texts ------------------

    def touched(self, job_ids: Iterable[Any]) -> None:
        """Until the WAL is wholly in the main file, a rewrite would lose these jobs' latest writes."""
        self._unsaved.note(job_ids, settled=self._pending_frames == 0)

    async def finished(self, tx: Tx, params: Sequence[dict[str, Any]], rows: Rows) -> None:
        if any(_is_big(p["stdout"]) or _is_big(p["stderr"]) for p in params):
            await self._unbind("requeue_job", "finish_job", "write_output")  # the last flush's text too
        if self._daemon:
            self._unsaved.record(params, rows)

    async def _unbind(self, *queries: str) -> None:
        """Run each named write with every parameter NULL: it matches no row (`id = NULL` is never true), and SQLite
        lets go of the text the statement was last bound to. Inside the caller's transaction."""
        for query in queries:
            await self._conn.execute(Q[query], _Nulls())

    # -- schema, backups --------------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        applied = await self.transaction(lambda _: schema.migrate(self._conn, now_ms()))
        for name in applied:
            logger.info("db.migrated", migration=name, db=str(self.path))
        return applied

    async def check(self) -> list[str]:
        return await schema.check(self._conn)

    async def backup(self, target: Path) -> None:
        """A consistent copy through SQLite's online backup API: safe while the daemon and others write."""
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise JobdError(f"{target} exists; give a new file name (a backup never overwrites)") from None
        except OSError as e:
            raise JobdError(f"{target}: cannot create the backup file: {e.strerror}") from e
        dest = await aiosqlite.connect(target)
        try:
            await self._conn.backup(dest)
        finally:
            await dest.close()

    # -- noticing other programs' commits (the change source's probe) ---------------------------------------------

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> QueueChanges:
        return QueueChanges(self, self.path, on_change, poll_s)

    def row_changes(self, on_change: Callable[[], None], *, poll_s: float) -> RowChanges:
        return RowChanges(self, self.path, on_change, poll_s)

    def anyone_committed(self) -> bool:
        """Has any connection, ours included, committed since the last call? Cheap enough to ask often.

        It runs in the caller's thread on a connection of its own (reading the WAL index in shared memory takes
        microseconds), so a wake-up that finds nothing new costs no round trip to the database thread.
        """
        try:
            if self._probe is None:
                self._probe = sqlite3.connect(self.path, timeout=0.05, isolation_level=None)
                guard.no_checkpoint_on_close(self._probe)
            version = int(self._probe.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error:
            return True  # let the full check decide
        changed = version != self._probe_version
        self._probe_version = version
        return changed

    async def data_version(self) -> int:
        """Changes whenever another connection commits (our own commits do not move it)."""
        return int((await self.read("data_version")).first("data_version"))

    def wrote_just_now(self, within_s: float = 0.01) -> bool:
        """Is a write of ours under way, or did one just end? A change notification now is most likely ours."""
        return self._writing or time.monotonic() - self._wrote_at < within_s

    # -- another program rewriting the file -------------------------------------------------------------------

    @property
    def unwritable(self) -> str | None:
        """Why the file is no longer ours, as last found by check_rewritten (no new look)."""
        return self._rewritten

    def check_rewritten(self) -> str | None:
        """Why the file is no longer the one we hold (another program rewrote it), or None. A stat and a 100-byte
        read: cheap enough for every wake-up. Once it says so, every write of ours raises DatabaseRewritten."""
        if self._rewritten is None and self._guard is not None and (problem := self._guard.problem()):
            self._rewritten = problem
        return self._rewritten

    async def quarantine(self, *, running: Sequence[Mapping[str, Any]], worker: Mapping[str, Any]) -> Quarantine:
        """Leave the rewritten file exactly as the other program wrote it: never checkpoint, and move our WAL aside
        so that no program replays it onto the new file; report, and keep the ends recorded only in that WAL
        beside it (setaside.Unsaved)."""
        reason = self._rewritten or "quarantined"
        self._rewritten = reason
        async with self._write_lock:  # a write already under way lands (in the WAL set aside) and is noted first
            pending = self._guard.frames_not_checkpointed() if self._guard else None
            results = list(self._unsaved.results.values()) if pending != 0 else []
            # Our connections stay open (reads are harmless; closing checkpoints nothing: no_checkpoint_on_close).
            kept = self._unsaved.set_aside(reason, lost=pending != 0)
        return self._unsaved.report(kept, results, running=running, worker=worker)

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._unsaved.keep(rows)

    async def apply_set_aside(self) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        for pending in rewrites.pending(self.path):
            actions = await self.transaction(partial(apply_pending, pending=pending))
            pending.mark_applied({"by_pid": os.getpid(), "jobs": actions})
            done += [action | {"report": str(pending.report)} for action in actions]
        return done

    def writes_settled(self) -> bool:
        return self._pending_frames == 0 or not self._daemon

    async def idle(self) -> None:
        """A checkpoint now, into a file still ours: an idle daemon's writes then survive a rewrite. Then SQLite's
        page cache goes (up to 2 MiB, full of the rows just written: pages needed later are read again)."""
        if self._daemon and self._pending_frames and self.check_rewritten() is None:
            async with self._write_lock:
                await self._checkpoint_if_due(now=True)
        await self._conn.execute("PRAGMA shrink_memory")

    async def _checkpoint_if_due(self, *, now: bool = False) -> None:
        """The daemon's checkpoint, in place of SQLite's automatic one at commit: only into a file still ours."""
        self._pending_frames = self._guard.frames_not_checkpointed() if self._guard else None
        due = 1 if now else CHECKPOINT_FRAMES
        if not self._daemon or self._pending_frames is None or self._pending_frames < due:
            return
        if self.check_rewritten() is not None:
            return
        try:
            rows = list(await self._conn.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)"))
        except sqlite3.Error as e:  # the write before it did land: a failed checkpoint must not look like its failure
            logger.warning("db.checkpoint_failed", db=str(self.path), error=str(e))
            return
        _busy, log_frames, copied = rows[0]
        if log_frames == copied:
            self._pending_frames = 0
            self._unsaved.saved()


class _Nulls(dict[str, Any]):
    """Statement parameters that are all NULL, whatever their names."""

    def __missing__(self, key: str) -> None:
        return None


def _is_big(text: str | None) -> bool:
    return text is not None and len(text) >= _BIG_TEXT
