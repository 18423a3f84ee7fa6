"""The SQLite backend (the embedded default): opening the file, schema and migrations, claims, output, finishing,
and CLI reads. The only module that imports aiosqlite. Every status change is a named compare-and-set query.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import pwd
import re
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio

from daemon import logging as log
from daemon.errors import DatabaseError, DatabaseRewritten, JobdError, WholeFileWriter
from daemon.model import (
    AdoptedJob,
    Claim,
    ClaimedJob,
    JobResult,
    JobStatus,
    OrphanedJob,
    OutputSnapshot,
    ProcessRef,
    Quarantine,
    RawText,
    Worker,
    now_ms,
)
from daemon.store.base import WORKERS_KEPT, WORKERS_KEPT_MS, DbRejected, Store, cycles, page_params
from daemon.store.sqlite import guard, rewrites
from daemon.store.sqlite.queries import HERE, Q, read_sql, split_statements
from daemon.store.sqlite.wakeup import QueueChanges, RowChanges

T = TypeVar("T")
_ADD_COLUMN = re.compile(r"ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.IGNORECASE)
_BASE_COLUMNS = {
    "jobs": ("id", "conversation_id", "message_id", "node_id", "tool", "command", "status", "exit_code",
             "stdout", "stderr", "duration", "created_at", "started_at", "completed_at"),
    "nodes": ("id", "hostname", "ip_address", "status", "capabilities", "last_heartbeat", "created_at"),
    "conversations": ("id", "title", "created_at", "updated_at", "metadata"),
    "messages": ("id", "conversation_id", "role", "content", "created_at", "metadata"),
}
CHECKPOINT_FRAMES = 1000  # SQLite's own wal_autocheckpoint default, done by the daemon after checking the file
_LOCK_RETRY_S = 0.05
_LOCK_RETRY_MAX_S = 2.0
# SQLite keeps its own copy of each statement's last bound text until the statement is bound again (Python never
# clears bindings): a finish that bound output this long binds its statements to NULLs before it commits.
_BIG_TEXT = 256 * 1024

logger = log.get("store")


def _migrations() -> list[tuple[str, str]]:
    return [(path.stem, path.read_text(encoding="utf-8")) for path in sorted((HERE / "migrations").glob("*.sql"))]


def _is_locked(error: sqlite3.OperationalError) -> bool:
    return "locked" in str(error) or "busy" in str(error)


def _text_or_bytes(data: bytes) -> str | RawText:
    """TEXT that is not valid UTF-8 (another program wrote raw bytes) becomes RawText instead of failing the whole
    query: the row it is in then fails alone, with a reason (claim, daemon.tools)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return RawText(data)


def _connector(path: Path) -> Callable[[], sqlite3.Connection]:
    def connect() -> sqlite3.Connection:  # in aiosqlite's thread, which then owns the connection
        conn = sqlite3.connect(path, isolation_level=None)
        guard.no_checkpoint_on_close(conn)
        return conn

    return connect


def _set_aside_stale_wal(path: Path) -> None:
    """A WAL with frames beside a file whose header no longer says WAL (a daemon killed before it saw another
    program rewrite the file): any program that opens the file would replay those frames onto it. Set aside before
    anything opens it, and reported; the file is then as the other program wrote it."""
    if (problem := guard.stale_wal(path)) is None:
        return
    suffix = rewrites.new_suffix(path)
    try:
        moved = guard.set_aside(path, suffix)
    except OSError as e:
        raise DatabaseRewritten(f"{problem}; it could not be set aside ({e}). {guard.stale_wal_way_out(path)}") from e
    message = (f"{problem}. It was set aside as {', '.join(map(str, moved))}: the file is used as the other program "
               "left it, and nothing of what only that WAL held (a daemon's last writes) is in it")
    report = rewrites.report_path(path, suffix)
    rewrites.write_report(report, {"message": message, "reason": "a WAL left beside a file another program rewrote",
                                   "detected_at": now_ms(), "wal_set_aside": [str(p) for p in moved],
                                   "not_recorded": [], "running": [], "attempts": [], "results": None})
    logger.warning("db.stale_wal_set_aside", db=str(path), wal_set_aside=[str(p) for p in moved], report=str(report),
                   message=message)


def read_only_mount(path: Path) -> Path | None:
    """The mount point of the filesystem the database is (or would be created) on, if it is mounted read-only:
    no chmod, chown or user can write it then."""
    path = Path(os.path.realpath(path))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not os.statvfs(existing).f_flag & os.ST_RDONLY:
        return None
    device = existing.stat().st_dev
    mount = existing
    while mount.parent != mount and mount.parent.stat().st_dev == device:
        mount = mount.parent
    return mount


def _read_only_fs_problem(path: Path, mount: Path) -> str:
    return (f"{path}: the filesystem at {mount} is mounted read-only, so nothing can write the database. Mount it "
            f"read-write (mount -o remount,rw {mount}) or move the database to a writable filesystem; commands that "
            "only read (ps, show, logs, status, nodes, backup, db check) work as it is")


def _create_private(path: Path) -> None:
    """A new database is readable and writable by its owner only: writing it means running commands. Where a link
    leads (O_EXCL would refuse the link itself, and SQLite would then create the file with the umask's mode)."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SqliteStore(Store):
    """One aiosqlite connection. In autocommit mode every named statement is its own atomic transaction."""

    path: Path

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self.name = str(path)
        self._probe: sqlite3.Connection | None = None
        self._probe_version: int | None = None
        # Writes take this lock in the order their data was rendered, so a transaction of several statements
        # never interleaves with another write and an older output snapshot never lands after a newer one.
        self._write_lock = asyncio.Lock()
        self._writing = False
        self._wrote_at = -math.inf  # monotonic time our last write ended
        self._guard: guard.RewriteGuard | None = None  # set once the file is ours in WAL mode
        self._rewritten: str | None = None  # why the file is no longer ours: from then on nothing is written
        self._closed = False
        self._daemon = False  # the daemon checkpoints by itself (after checking the file), not at each commit
        self._pending_frames: int | None = None  # WAL frames not yet in the main file, after our last write
        self._unsaved: set[str] = set()  # jobs written since the WAL was last wholly copied into the main file
        # The ends recorded since then, as a report beside the file would keep them (rewrites.Pending): a rewrite
        # would lose them with the WAL. About the WAL's size at most: it is checkpointed at 1000 frames.
        self._unsaved_results: dict[str, dict[str, Any]] = {}
        self._kept: Quarantine | None = None  # where results go once the file is no longer ours

    # -- opening and schema -------------------------------------------------------------------------------

    @classmethod
    async def open_file(cls, path: Path, *, busy_timeout_ms: int = 5000, create: bool = True,
                        daemon: bool = False, read_only_ok: bool = False, reads_only: bool = False,
                        take_over: bool = False) -> SqliteStore:
        """`daemon`: the long-lived connection of `nexus-jobd run`, which also watches the file for rewrites.
        `read_only_ok`: a file this user may not write is opened read-only (`read_only` then says so); without it,
        such a file is refused as the permissions problem it is. `reads_only`: a command that only reads opens a
        migrated file read-only whoever may write it (nothing it does can leave a WAL behind). A table of the
        contract that is something else (another program's `jobs`, a view) is refused either way: no migration can
        fix it. So is a file that a whole-file writer keeps (guard.whole_file_writer), unless `take_over`."""
        if os.path.isdir(path):  # noqa: ASYNC240 -- one stat at start-up
            raise DatabaseError(f"{path} is a directory, not a database file; give the file's path, e.g. "
                                f"{Path(path) / 'nexuscli.db'}")
        if not create and not os.path.exists(path):  # noqa: ASYNC240 -- one stat at start-up
            raise DatabaseError(f"{path}: no such database; check --db / NEXUS_JOBD_DB, or create it with "
                                "`nexus-jobd run` or `nexus-jobd db migrate`")
        denied = cls._write_denied(path)
        if not denied:
            _set_aside_stale_wal(path)
        if ((denied and read_only_ok) or reads_only) and os.access(path, os.R_OK):
            store = await cls._open_read_only(path, busy_timeout_ms, denied)
            if store is not None:
                return store
        if denied:
            raise DatabaseError(cls._permissions_problem(path, denied))
        if (mount := read_only_mount(path)) is not None:  # no file yet: nothing can create it
            raise DatabaseError(_read_only_fs_problem(path, mount))
        return await cls._open_writable(path, busy_timeout_ms, create=create, daemon=daemon,
                                        take_over=take_over or cls._says_wal(path))

    @classmethod
    async def _open_writable(cls, path: Path, busy_timeout_ms: int, *, create: bool, daemon: bool,
                             take_over: bool) -> SqliteStore:
        try:
            if create:
                _create_private(path)
            conn = await aiosqlite.Connection(_connector(path), iter_chunk_size=64)
        except (OSError, sqlite3.Error) as e:
            raise DatabaseError(f"{path}: cannot open the database: {e}") from e
        conn.text_factory = _text_or_bytes
        store = cls(conn, path)
        try:
            problems = await store._configure(busy_timeout_ms, take_over=take_over)
            if daemon:
                store._daemon = True
                await conn.execute("PRAGMA wal_autocheckpoint = 0")
        except DatabaseRewritten:
            await conn.close()
            raise
        except sqlite3.Error as e:
            await conn.close()
            raise DatabaseError(f"{path}: not a usable SQLite database: {e}{cls._readonly_hint(e)}") from e
        if problems:
            await conn.close()
            raise DatabaseError(cls._unusable(path, problems))
        store._guard = guard.RewriteGuard(path)
        return store

    @staticmethod
    def _says_wal(path: Path) -> bool:
        """The file's header says WAL (or there is no file yet to be another program's)."""
        try:
            header = guard.read_header(path)
        except OSError:
            return True
        return header.says_wal or not header.raw

    async def _configure(self, busy_timeout_ms: int, *, take_over: bool) -> list[str]:
        """Settings of our connection, and WAL for the file; first, what makes the file unusable (another program's
        `jobs`), returned with nothing changed, and a whole-file writer's file refused (DatabaseRewritten) unless
        `take_over`."""
        await self._conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if problems := await self._contract_problems():
            return problems
        if not take_over and (tables := guard.whole_file_writer(set(await self._schema_kinds()))):
            raise WholeFileWriter(guard.whole_file_writer_message(self.path, tables))
        rows = await self._conn.execute_fetchall("PRAGMA journal_mode = WAL")
        mode = next(iter(rows))[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL could not be enabled")
        # NORMAL is durable across a crash of any process in WAL mode; only a power cut can lose a last commit.
        await self._conn.execute("PRAGMA synchronous = NORMAL")
        await self._conn.execute("PRAGMA foreign_keys = ON")
        # A burst of output can grow the WAL to hundreds of MB; give the space back after checkpoints.
        await self._conn.execute("PRAGMA journal_size_limit = 67108864")
        return []

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
        elif self._guard is not None and self._kept is None:  # rewritten under a command: its writes go aside
            with contextlib.suppress(OSError):
                await self.quarantine(running=[], worker={})
        self._closed = True
        if self._probe is not None:
            self._probe.close()
        await self._conn.close()
        if self._guard is not None:
            self._guard.close()  # last: closing its descriptors would drop SQLite's locks

    # -- another program rewriting the file -----------------------------------------------------------------

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
        (`<db>-wal.<suffix>`) so that no program replays it onto the new file. The report beside it says what was
        seen and which attempts ran; the ends recorded only in that WAL are kept beside it too (rewrites)."""
        reason = self._rewritten or "quarantined"
        self._rewritten = reason
        async with self._write_lock:  # a write already under way lands (in the WAL set aside) and is noted first
            pending = self._guard.frames_not_checkpointed() if self._guard else None
            unrecorded = sorted(self._unsaved) if pending != 0 else []
            results = list(self._unsaved_results.values()) if pending != 0 else []
            suffix = rewrites.new_suffix(self.path)
            # Our connections stay open (reads are harmless; closing checkpoints nothing: no_checkpoint_on_close).
            kept = Quarantine(reason, guard.rewritten_message(self.path, reason), guard.set_aside(self.path, suffix),
                              unrecorded, rewrites.report_path(self.path, suffix),
                              rewrites.results_path(self.path, suffix))
        self._kept = kept
        try:  # the WAL is aside already: a full disk may keep the rest from being written, not that
            rewrites.write_report(kept.report, {
                "message": kept.message, "reason": reason, "detected_at": now_ms(), "worker": dict(worker),
                "worker_id": worker.get("worker_id"), "wal_set_aside": [str(p) for p in kept.set_aside],
                "not_recorded": unrecorded, "running": sorted(str(job["id"]) for job in running),
                "attempts": [dict(job) for job in running], "results": str(kept.results)})
            self.keep_results(results)
        except OSError as e:
            logger.error("job.results_not_kept", path=str(kept.report), error=str(e),
                         jobs=[r["id"] for r in results], consequence="what ran them keeps them meanwhile")
            return dataclasses.replace(kept, kept=False)
        self._unsaved_results.clear()
        return kept

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        if self._kept is None:
            raise DatabaseError(f"{self.path}: results are kept beside the file only once it was found rewritten")
        rewrites.write_private(self._kept.results, "".join(json.dumps(dict(row)) + "\n" for row in rows),
                               append=True)

    async def apply_set_aside(self) -> list[dict[str, Any]]:
        done: list[dict[str, Any]] = []
        for pending in rewrites.pending(self.path):
            actions = await self._transaction(partial(self._apply_pending, pending))
            pending.mark_applied({"by_pid": os.getpid(), "jobs": actions})
            done += [action | {"report": str(pending.report)} for action in actions]
        return done

    async def _apply_pending(self, pending: rewrites.Pending) -> list[dict[str, Any]]:
        """Inside a transaction: each kept result recorded (unless the row moved on), then each attempt that was
        running and whose end nobody kept claimed again under its dead daemon, for recovery to settle."""
        actions = []
        ended = set()
        for result in pending.results:
            if (params := _applied_params(result)) is None:
                continue
            ended.add((params["id"], result["attempt"]))
            rows = list(await self._conn.execute_fetchall(Q["apply_kept_result"], params))
            actions.append({"job_id": params["id"], "attempt": params["attempt"],
                            "action": f"recorded {rows[0][1]}" if rows else "left as it is (the row moved on)"})
        worker = pending.data.get("worker")
        attempts = [a for a in pending.data.get("attempts") or [] if isinstance(a, dict)
                    and (a.get("id"), a.get("attempt")) not in ended]
        if attempts and isinstance(worker, dict) and isinstance(worker.get("worker_id"), str):
            await self._conn.execute(Q["restore_worker"], {
                "id": worker["worker_id"], "host": str(worker.get("host")), "boot_id": worker.get("boot_id"),
                "pid": worker.get("pid") or 0, "pid_start": worker.get("pid_start"),
                "started_at": pending.data.get("detected_at") or 0})
            for a in attempts:
                rows = list(await self._conn.execute_fetchall(Q["restore_claim"], {
                    "id": a.get("id"), "attempt": a.get("attempt"), "worker_id": worker["worker_id"],
                    "started_at": a.get("started_at"), "pid": a.get("pid"), "pid_start": a.get("pid_start")}))
                actions.append({"job_id": a.get("id"), "attempt": a.get("attempt"),
                                "action": "claimed again for recovery" if rows else "left as it is (the row moved on)"})
        return actions

    def _note(self, job_ids: Iterable[Any]) -> None:
        """Jobs our last write touched: until the WAL is wholly in the main file, a rewrite would lose them."""
        if self._pending_frames == 0:
            self._saved()
        else:
            self._unsaved.update(i for i in job_ids if isinstance(i, str))

    def _saved(self) -> None:
        self._unsaved.clear()
        self._unsaved_results.clear()

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
            self._saved()

    async def migrate(self) -> list[str]:
        """Create the base schema where missing and apply the daemon's pending migrations; idempotent."""
        applied: list[str] = []

        async def work() -> None:
            for statement in split_statements(read_sql("schema.sql")):
                await self._conn.execute(statement)
            done = {row[0] for row in await self._conn.execute_fetchall(Q["applied_migrations"])}
            for name, text in _migrations():
                if name in done:
                    continue
                for statement in split_statements(text):
                    if not await self._column_exists_for(statement):
                        await self._conn.execute(statement)
                await self._conn.execute(Q["record_migration"], {"name": name, "now": now_ms()})
                applied.append(name)

        await self._transaction(work)
        for name in applied:
            logger.info("db.migrated", migration=name, db=str(self.path))
        return applied

    async def _column_exists_for(self, statement: str) -> bool:
        match = _ADD_COLUMN.search(statement)
        if not match:
            return False
        return match.group(2) in await self._columns(match.group(1))

    async def _columns(self, table: str) -> set[str]:
        rows = await self._conn.execute_fetchall(f"PRAGMA table_info({table})")
        return {row[1] for row in rows}

    async def check(self) -> list[str]:
        """Problems that would stop the daemon or other programs from using the database; empty when fine."""
        problems: list[str] = []
        for table, columns in _BASE_COLUMNS.items():
            have = await self._columns(table)
            if not have:
                problems.append(f"table {table!r} is missing (run `nexus-jobd db migrate`)")
                continue
            missing = [c for c in columns if c not in have]
            if missing:
                problems.append(f"table {table!r} lacks the contract's columns {', '.join(missing)}")
        if await self._columns("jobd_migrations"):
            done = {row[0] for row in await self._conn.execute_fetchall(Q["applied_migrations"])}
            pending = [name for name, _ in _migrations() if name not in done]
            if pending:
                problems.append(f"migrations not applied: {', '.join(pending)} (run `nexus-jobd db migrate`)")
        else:
            problems.append("the daemon's migrations table is missing (run `nexus-jobd db migrate`)")
        rows = await self._conn.execute_fetchall("PRAGMA quick_check")
        verdict = [row[0] for row in rows]
        if verdict != ["ok"]:
            problems.append(f"integrity: {'; '.join(verdict[:5])}")
        return problems

    # -- opening: what no migration can fix, permissions, read-only ---------------------------------------

    async def _schema_kinds(self) -> dict[str, str]:
        return {str(name).lower(): kind for name, kind in await self._conn.execute_fetchall(Q["schema_objects"])}

    async def _contract_problems(self) -> list[str]:
        """Tables of the contract (or the daemon's own) that exist as something else, or lack the contract's
        columns: another program's database, which no migration can fix. A missing table is no problem here:
        migrate creates it."""
        kinds = await self._schema_kinds()
        problems = [f"{name!r} is a {kinds[name]}, not a table"
                    for name in (*_BASE_COLUMNS, "jobd_migrations", "jobd_workers")
                    if kinds.get(name, "table") != "table"]
        for table, columns in _BASE_COLUMNS.items():
            if kinds.get(table) == "table":
                have = await self._columns(table)
                if missing := [c for c in columns if c not in have]:
                    problems.append(f"table {table!r} lacks the contract's columns {', '.join(missing)}")
        return problems

    async def _not_migrated(self) -> list[str]:
        """What only a writable open (migrate) adds: missing tables, the daemon's pending migrations."""
        kinds = await self._schema_kinds()
        problems = []
        if absent := [table for table in _BASE_COLUMNS if table not in kinds]:
            problems.append(f"tables {', '.join(absent)} are missing")
        done: set[Any] = set()
        if kinds.get("jobd_migrations") == "table":
            done = {row[0] for row in await self._conn.execute_fetchall(Q["applied_migrations"])}
        if pending := [name for name, _ in _migrations() if name not in done]:
            problems.append(f"the daemon's migrations {', '.join(pending)} are not applied (its columns are missing)")
        return problems

    @staticmethod
    def _unusable(path: Path, problems: Sequence[str]) -> str:
        return (f"{path}: not a usable database: {'; '.join(problems)}. It is not the jobs database of NexusCLI or "
                "nexus-jobd (nothing was changed): check --db / NEXUS_JOBD_DB")

    @staticmethod
    def _user(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return f"uid {uid}"

    @classmethod
    def _write_denied(cls, path: Path) -> str | None:
        """What this user may not write or read: the file, a -wal/-shm beside it, or the directory SQLite creates
        those in. None when nothing stands in the way, or when there is no file yet (creating it says why not)."""
        path = Path(path)

        def described(p: Path) -> str:
            st = p.stat()
            return f"{p} (owned by {cls._user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"

        if not path.exists():
            return None
        if (mount := read_only_mount(path)) is not None:
            return f"the filesystem at {mount} is mounted read-only"
        try:
            me = f"{cls._user(os.geteuid())} (uid {os.geteuid()})"
            if not os.access(path, os.R_OK):
                return f"user {me} may not read {described(path)}"
            if not os.access(path, os.W_OK):
                return f"user {me} may not write {described(path)}"
            sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
            for sidecar in sidecars:
                if sidecar.exists() and not os.access(sidecar, os.W_OK):
                    return f"user {me} may not write {described(sidecar)}, which SQLite keeps beside the database"
            directory = path.absolute().parent
            if not os.access(directory, os.W_OK | os.X_OK) and not all(s.exists() for s in sidecars):
                return (f"user {me} may not write the directory {described(directory)}, where SQLite creates "
                        f"{path.name}-wal and {path.name}-shm beside the database")
        except FileNotFoundError:
            return None
        return None

    @classmethod
    def _permissions_problem(cls, path: Path, denied: str) -> str:
        if (mount := read_only_mount(path)) is not None:
            return _read_only_fs_problem(path, mount)
        try:
            owner_uid = os.stat(path).st_uid
        except OSError:
            owner_uid = -1
        if owner_uid == os.geteuid():
            fix = "Give this user write access there (chmod/chown), or move the database where it may write"
        else:
            owner = cls._user(owner_uid) if owner_uid >= 0 else "the database's owner"
            fix = (f"Run nexus-jobd as {owner} (e.g. `sudo -u {owner} nexus-jobd ...`), or give this user write "
                   "access (chown/chmod)")
        return (f"{path}: a permissions problem: {denied}. {fix}; commands that only read (ps, show, logs, status, "
                "nodes, backup, db check) need only read access to the file")

    @staticmethod
    def _readonly_hint(error: sqlite3.Error) -> str:
        if "readonly" not in str(error) and "unable to open" not in str(error):
            return ""
        return (" (a permissions problem: this user may not write the file, or the directory SQLite keeps its -wal "
                "and -shm in)")

    @classmethod
    async def _open_read_only(cls, path: Path, busy_timeout_ms: int, denied: str | None) -> SqliteStore | None:
        """For commands that only read: no switch to WAL, no migration, no write, so no WAL left behind. A file this
        user may not write (`denied` says why): with a -wal beside it (a writer at work), or in rollback-journal
        mode, through SQLite's read-only mode, which reads that WAL; a WAL-mode file without one has everything in
        it: read as it stands (immutable), since read-only mode would create a -wal and -shm owned by this user,
        which the file's owner then could not write. A file this user may write: read-only mode (it sees what
        daemons write meanwhile); None if the file needs a migration first, which only a writable open does."""
        wal = denied is None or os.path.exists(f"{path}-wal") or not guard.read_header(path).says_wal  # noqa: ASYNC240
        uri = Path(path).absolute().as_uri() + ("?mode=ro" if wal else "?immutable=1")  # noqa: ASYNC240 -- no I/O
        why = cls._permissions_problem(path, denied) if denied else f"{path}: cannot open the database to read it"
        try:
            conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
        except sqlite3.Error as e:
            raise DatabaseError(f"{why}. Reading it failed too: {e}") from e
        conn.text_factory = _text_or_bytes
        store = cls(conn, path)
        store.read_only, store.write_denied, store.read_only_fs = True, denied, read_only_mount(path)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            if problems := await store._contract_problems():
                raise DatabaseError(cls._unusable(path, problems))
            if (problems := await store._not_migrated()) and denied is None:
                await conn.close()
                return None
            if problems:
                raise DatabaseError(f"{path}: opened read-only, since {denied}; but {'; '.join(problems)}, and only "
                                    "a writable open adds them: run `nexus-jobd db migrate` (or start the daemon) "
                                    "once as a user who may write it")
        except sqlite3.Error as e:
            await conn.close()
            raise DatabaseError(f"{why}. Reading it failed too: {e}") from e
        except DatabaseError:
            await conn.close()
            raise
        return store

    async def live_daemons_serving(self, node_id: Any, *, lease_ttl_ms: int) -> int:
        """How many daemons are alive (not stopped, heartbeat within the lease ttl) and serve this node."""
        rows = list(await self._conn.execute_fetchall(Q["live_daemons_serving"],
                                                      {"node_id": node_id, "ttl_ms": lease_ttl_ms}))
        return int(rows[0][0])

    # -- plumbing -----------------------------------------------------------------------------------------

    async def _transaction(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` inside BEGIN IMMEDIATE ... COMMIT, retrying while another process holds the lock."""

        async def attempt() -> T:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                if self.check_rewritten() is not None:  # it may have come while we waited for the lock
                    raise DatabaseRewritten(f"{self.path}: {self._rewritten}; nothing more is written to it")
                result = await work()
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

    def wrote_just_now(self, within_s: float = 0.01) -> bool:
        """Is a write of ours under way, or did one just end? A change notification now is most likely ours."""
        return self._writing or time.monotonic() - self._wrote_at < within_s

    async def _retry_locked(self, op: Callable[[], Awaitable[T]]) -> T:
        """The busy timeout already waited; past it, keep retrying: a write we drop would lose a job's state."""
        delay = _LOCK_RETRY_S
        while True:
            try:
                return await op()
            except sqlite3.OperationalError as e:
                if not _is_locked(e):
                    raise
                logger.warning("db.locked", db=str(self.path), retry_in_s=delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, _LOCK_RETRY_MAX_S)

    async def _write(self, query: str, params: dict[str, Any]) -> list[sqlite3.Row]:
        async def op() -> list[sqlite3.Row]:
            return list(await self._conn.execute_fetchall(Q[query], params))

        async with self._writer():
            return await self._retry_locked(op)

    async def _write_count(self, query: str, params: dict[str, Any]) -> int:
        """A write whose answer is how many rows it changed."""

        async def op() -> int:
            cursor = await self._conn.execute(Q[query], params)
            return int(cursor.rowcount)

        async with self._writer():
            return await self._retry_locked(op)

    # -- the daemon's side --------------------------------------------------------------------------------

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

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> QueueChanges:
        return QueueChanges(self, self.path, on_change, poll_s)

    async def data_version(self) -> int:
        """Changes whenever another connection commits (our own commits do not move it)."""
        rows = await self._conn.execute_fetchall(Q["data_version"])
        return int(next(iter(rows))[0])

    async def fail_malformed(self) -> list[tuple[Any, str]]:
        """Queued rows whose id, run_after or depends_on no program could mean: failed at once, with why."""
        rows = await self._write("fail_malformed", {})
        self._note(row[0] for row in rows)  # an id that is no text comes as its SQL literal, X'...'
        return [(row[0], row[1]) for row in rows]

    async def fail_unknown_nodes(self, node_ids: Sequence[str]) -> list[tuple[str, Any]]:
        known = ", ".join(node_ids)
        error = (f"unknown node: no daemon on this database serves it (this one serves {known}); set node_id to "
                 "a configured node")
        rows = await self._write("fail_unknown_nodes", {"nodes": json.dumps(list(node_ids)), "error": error})
        self._note(row[0] for row in rows)
        return [(row[0], row[1]) for row in rows]

    async def claim(self, node_id: str, limit: int, worker_id: str) -> list[ClaimedJob]:
        rows = await self._write("claim_jobs", {"node_id": node_id, "limit": limit, "worker_id": worker_id})
        self._note(row[0] for row in rows)
        if bad := [row for row in rows if isinstance(row[0], RawText)]:
            try:
                await self._fail_raw_ids(bad, worker_id)
            except (sqlite3.Error, DatabaseRewritten) as e:  # the good rows are ours now: they must still run
                logger.error("db.write_failed", what="fail rows with an undecodable id", error=str(e))
        ordered = sorted((row for row in rows if not isinstance(row[0], RawText)), key=_claim_order)
        return [ClaimedJob(*row[:-1]) for row in ordered]  # all but the rowid

    async def _fail_raw_ids(self, rows: Sequence[sqlite3.Row], worker_id: str) -> None:
        """A claimed row whose id is not valid UTF-8 never becomes a running job: every later step names the job by
        its id, in JSON and in logs. It fails at once, found by rowid."""
        for row in rows:
            raw = RawText(row[0])
            error = (f"id is not valid UTF-8 text (byte {raw.bad_byte()}: {str(raw)!r}); store ids as UTF-8 text")
            await self._write_count("fail_claimed_row", {"rowid": row[-1], "worker_id": worker_id, "error": error})
            logger.warning("job.failed", job_id=str(raw), reason=error)

    async def write_outputs(self, updates: Iterable[tuple[Claim, OutputSnapshot, ProcessRef | None]]) -> None:
        """Flush live output (and where it runs) of several jobs in one transaction, however many jobs."""
        params = [_output_params(claim, out) | {"pid": proc.pid if proc else None,
                                                  "pid_start": proc.start if proc else None}
                  for claim, out, proc in updates]
        if not params:
            return

        async def work() -> None:
            await self._conn.executemany(Q["write_output"], params)

        await self._transaction(work)
        self._note(p["id"] for p in params)

    async def finish_many(self, items: Sequence[tuple[Claim, JobResult]]
                          ) -> dict[str, tuple[JobStatus, int | None]]:
        """Record the end of several jobs in one transaction (a group commit).

        Returns job id -> (the row's status now, duration ms or None if re-queued) for the writes that took; a job
        missing from it
        is no longer ours (another program deleted or re-queued it) and its row was left untouched.
        """
        if not items:
            return {}
        params = []
        for claim, result in items:
            p = _output_params(claim, result.output)
            p.update(status=result.status.value, exit_code=result.exit_code, error=result.error,
                     run_after=result.run_after, uncount=int(result.uncount))
            params.append(p)
        requeues = [p for p, (_, result) in zip(params, items, strict=True) if result.requeue]
        worker_id = items[0][0].worker_id
        claims = json.dumps([[claim.job_id, claim.attempt] for claim, _ in items])
        args = {"claims": claims, "worker_id": worker_id}

        async def work() -> dict[str, tuple[JobStatus, int | None]]:
            ours = {row[0] for row in await self._conn.execute_fetchall(Q["unfinished_claims"], args)}
            for p, (_, result) in zip(params, items, strict=True):  # now that the rows' locks are ours
                p["late_ms"] = result.late_ms()
            if requeues:  # first: a requeue that does not take (the row was cancelled) is then finished
                await self._conn.executemany(Q["requeue_job"], requeues)
            await self._conn.executemany(Q["finish_job"], params)
            rows = [row for row in await self._conn.execute_fetchall(Q["finished_claims"], args) if row[0] in ours]
            if any(_is_big(p["stdout"]) or _is_big(p["stderr"]) for p in params):
                await self._unbind("requeue_job", "finish_job", "write_output")  # the last flush's text too
            if self._daemon:
                by_id = {p["id"]: p for p in params}
                self._unsaved_results.update((row[0], _kept_result(by_id[row[0]], row)) for row in rows)
            return {row[0]: (JobStatus(row[1]), row[2]) for row in rows}

        finished = await self._transaction(work)
        self._note(claim.job_id for claim, _ in items)
        return finished

    async def _unbind(self, *queries: str) -> None:
        """Run each named write with every parameter NULL: it matches no row (`id = NULL` is never true), and SQLite
        lets go of the text the statement was last bound to. Inside the caller's transaction."""
        for query in queries:
            await self._conn.execute(Q[query], _Nulls())

    async def fail_blocked_dependencies(self) -> list[tuple[str, Any]]:
        """Fail queued rows whose dependency can no longer complete; repeated so chains fail in one call."""
        failed: list[tuple[str, Any]] = []
        while rows := await self._write("fail_blocked_dependencies", {}):
            failed += [(row[0], row[1]) for row in rows]
            self._note(row[0] for row in rows)
        return failed

    async def fail_dependency_cycles(self) -> list[tuple[str, Any]]:
        """Fail every queued row on a cycle of depends_on (of any length): none of them can ever start. Each row
        depends on one job at most, so one walk over the queue finds every cycle, in time linear in its size; only
        needed after another program wrote (the daemon never makes a cycle)."""

        async def work() -> list[tuple[str, Any]]:
            edges = {row[0]: row[1] for row in await self._conn.execute_fetchall(Q["queued_dependencies"])}
            failed: list[tuple[str, Any]] = []
            for cycle in cycles(edges):
                error = f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}; none of these jobs can ever start"
                for job_id in cycle:
                    rows = await self._conn.execute_fetchall(Q["fail_in_cycle"], {"id": job_id, "error": error})
                    failed += [(row[0], row[1]) for row in rows]
            return failed

        failed = await self._transaction(work)
        self._note(job_id for job_id, _ in failed)
        return failed

    async def has_dependents(self) -> bool:
        rows = list(await self._conn.execute_fetchall(Q["has_dependents"]))
        return bool(rows[0][0])

    async def next_run_after(self) -> int | None:
        rows = list(await self._conn.execute_fetchall(Q["next_run_after"]))
        return math.ceil(rows[0][0]) if rows and rows[0][0] is not None else None

    # -- leases and recovery ------------------------------------------------------------------------------

    async def register_worker(self, *, worker_id: str, host: str, boot_id: str | None, pid: int,
                              pid_start: int | None, nodes: Sequence[str]) -> None:
        await self._write("register_worker", {"id": worker_id, "host": host, "boot_id": boot_id, "pid": pid,
                                              "pid_start": pid_start, "nodes": json.dumps(list(nodes))})

    async def heartbeat(self, worker_id: str) -> bool:
        """Renew our lease; False means another daemon declared us dead and took our jobs."""
        return bool(await self._write("heartbeat", {"id": worker_id}))

    async def other_workers(self, worker_id: str) -> list[Worker]:
        rows = await self._conn.execute_fetchall(Q["other_workers"], {"id": worker_id})
        return [Worker(*row) for row in rows]

    async def stop_worker(self, worker_id: str, reason: str) -> bool:
        """Mark a worker stopped; True for the one caller that did it (and so recovers its jobs)."""
        return bool(await self._write("stop_worker", {"id": worker_id, "reason": reason}))

    async def orphaned_jobs(self, worker_id: str) -> list[OrphanedJob]:
        rows = await self._conn.execute_fetchall(Q["orphaned_jobs"], {"worker_id": worker_id})
        return [OrphanedJob(*row) for row in rows]

    async def resolve_orphan(self, worker_id: str, job: OrphanedJob, *, requeue: bool, error: str) -> bool:
        """Re-queue or fail a dead daemon's job: a compare-and-set on its claim, so a late finisher cannot win."""
        query = "requeue_orphan" if requeue else "fail_orphan"
        params = {"id": job.id, "worker_id": worker_id, "attempt": job.attempt, "error": error}
        done = await self._write_count(query, params) == 1
        self._note([job.id])
        return done

    async def adopt(self, old_worker_id: str, job: OrphanedJob, worker_id: str) -> AdoptedJob | None:
        """Take a dead or detached daemon's running job over for the same attempt; None if another daemon did,
        or it ended meanwhile."""
        rows = list(await self._write("adopt_job", {"id": job.id, "old_worker_id": old_worker_id,
                                                    "attempt": job.attempt, "worker_id": worker_id}))
        self._note([job.id])
        if not rows:
            return None
        row = rows[0]
        counts = [n if isinstance(n, int) and n >= 0 else 0 for n in (row[14], row[15])]
        texts = [t if isinstance(t, str) else None for t in (row[12], row[13])]
        return AdoptedJob(ClaimedJob(*row[:11]), row[11] == "cancelled", texts[0], texts[1], counts[0], counts[1])

    async def detached_jobs(self, node_ids: Sequence[str]) -> list[tuple[str, str, str | None, OrphanedJob]]:
        """(its stopped daemon, that daemon's host and boot id, job) for each unfinished job on these nodes whose
        daemon stopped without ending it."""
        rows = await self._conn.execute_fetchall(Q["detached_jobs"], {"nodes": json.dumps(list(node_ids))})
        return [(row[0], row[1], row[2], OrphanedJob(*row[3:])) for row in rows]

    async def finished_attempts(self, node_id: str) -> list[tuple[str, int]]:
        """(job id, attempt) of every attempt of this node's rows that can no longer be running: all but a row's
        latest one, and that one too once the row is final or back in the queue."""
        rows = await self._conn.execute_fetchall(Q["attempts_on_node"], {"node_id": node_id})
        return [(row[0], n) for row in rows if isinstance(row[1], int)
                for n in range(1, row[1] + (0 if row[2] else 1))]

    async def cancelled_among(self, job_ids: Iterable[str], worker_id: str) -> list[tuple[str, int]]:
        rows = await self._conn.execute_fetchall(Q["cancelled_among"], {"ids": json.dumps(sorted(set(job_ids))),
                                                                        "worker_id": worker_id})
        return [(row[0], row[1]) for row in rows]

    # -- the CLI's side -----------------------------------------------------------------------------------

    async def insert_job(self, *, node_id: str, tool: str, command: str, cwd: str | None = None,
                         env: dict[str, str] | None = None, priority: int = 0, timeout_ms: int | None = None,
                         max_attempts: int = 1, delay_ms: int | None = None,
                         depends_on: str | RawText | None = None, conversation_id: str | None = None,
                         message_id: str | None = None) -> str:
        import uuid  # the CLI's path only: the daemon never creates ids

        job_id = str(uuid.uuid4())
        await self._write("insert_job", {"id": job_id, "node_id": node_id, "tool": tool, "command": command,
                                         "now": now_ms(), "cwd": cwd, "priority": priority,
                                         "timeout_ms": timeout_ms, "max_attempts": max_attempts,
                                         "delay_ms": delay_ms, "depends_on": depends_on,
                                         "env": json.dumps(env) if env else None,
                                         "conversation_id": conversation_id, "message_id": message_id})
        return job_id

    # -- nodes --------------------------------------------------------------------------------------------

    async def upsert_nodes(self, nodes: Sequence[tuple[str, str, str | None]]) -> None:
        """(id, hostname, ip_address) of each configured node, in one transaction."""
        params = [{"id": i, "hostname": h, "ip_address": ip} for i, h, ip in nodes]

        async def work() -> None:
            await self._conn.executemany(Q["upsert_node"], params)

        await self._transaction(work)

    async def node_heartbeats(self, beats: Mapping[str, tuple[str, str]], served: Sequence[str]) -> list[str]:
        """node id -> (status, capabilities JSON); then nodes nobody serves go offline (their ids returned)."""
        params = [{"id": i, "status": s, "capabilities": c} for i, (s, c) in beats.items()]

        async def work() -> list[str]:
            await self._conn.executemany(Q["node_heartbeat"], params)
            rows = await self._conn.execute_fetchall(Q["unserved_nodes_offline"], {"nodes": json.dumps(list(served))})
            return [row[0] for row in rows]

        return await self._transaction(work)

    async def fail_node_jobs(self, node_id: str, error: str, *, queued_before: int | None = None) -> list[str]:
        rows = await self._write("fail_node_jobs", {"node_id": node_id, "error": error, "before": queued_before})
        self._note(row[0] for row in rows)
        return [row[0] for row in rows]

    async def nodes_overview(self) -> list[dict[str, Any]]:
        return await self._dicts("nodes_overview", {})

    async def job_counts(self) -> dict[str, int]:
        rows = list(await self._conn.execute_fetchall(Q["job_counts"]))
        queued, executing, last_minute, last_hour = rows[0]
        return {"queued": queued, "executing": executing, "finished_last_minute": last_minute,
                "finished_last_hour": last_hour}

    async def queue_by_node(self) -> dict[tuple[str, str], int]:
        """(node id, status) -> rows, for `queued` and `executing`: the queue as the database has it (metrics)."""
        rows = await self._conn.execute_fetchall(Q["queue_by_node"])
        return {(str(node_id), str(status)): count for node_id, status, count in rows}

    async def heartbeat_ages(self) -> dict[str, int]:
        """Node id -> ms since its last heartbeat by the database's clock, for nodes that had one (metrics)."""
        rows = await self._conn.execute_fetchall(Q["heartbeat_ages"])
        return {str(node_id): age for node_id, age in rows if isinstance(age, int)}

    async def prune(self, *, older_than_ms: int, statuses: Sequence[str]) -> int:
        """Delete finished jobs that ended more than `older_than_ms` ago; how many."""
        params = {"before": now_ms() - older_than_ms, "statuses": json.dumps(list(statuses))}
        return await self._write_count("prune_jobs", params)

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

    async def retry(self, job_id: str | RawText) -> bool:
        return bool(await self._write("retry_job", {"id": job_id}))

    async def workers(self) -> list[dict[str, Any]]:
        return await self._dicts("workers", {})

    async def cancel(self, job_ids: Sequence[str | RawText]) -> list[str | RawText]:
        """Cancel each job that has not ended, in one transaction; the ids of those cancelled."""

        async def work() -> list[str | RawText]:
            done = []
            for job_id in job_ids:
                rows = await self._conn.execute_fetchall(Q["cancel_job"], {"id": job_id, "now": now_ms()})
                done += [row[0] for row in rows]
            return done

        return await self._transaction(work)

    async def resolve_id(self, prefix: str) -> str | RawText:
        """A full id, or a unique prefix of one."""
        if not prefix:
            raise JobdError("an empty job id names no job")
        if await self.get_job(prefix) is not None:
            return prefix
        rows = list(await self._conn.execute_fetchall(Q["find_job_ids"], {"prefix": prefix}))
        if not rows:
            raise JobdError(f"no job with an id starting with {prefix!r}")
        if len(rows) > 1:
            raise JobdError(f"{prefix!r} names more than one job; give more characters of the id")
        found: str | RawText = rows[0][0]  # as stored: a RawText id still finds its row (get_job's CAST)
        return found

    async def get_job(self, job_id: str | RawText) -> dict[str, Any] | None:
        async with self._conn.execute(Q["get_job"], {"id": job_id}) as cursor:
            row = await cursor.fetchone()
            if row is None:
                return None
            return dict(zip([d[0] for d in cursor.description], row, strict=True))

    async def list_jobs(self, *, status: str | None, node_id: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._dicts("list_jobs", {"status": status, "node_id": node_id, "limit": limit})

    # -- the web console's side (daemon.web) ------------------------------------------------------------------

    def row_watcher(self, on_change: Callable[[], None], *, poll_s: float) -> RowChanges:
        return RowChanges(self, self.path, on_change, poll_s)

    async def find_jobs(self, *, status: str | None, node_id: str | None, text: str | None,
                        before: tuple[int, str] | None, limit: int) -> list[dict[str, Any]]:
        return await self._dicts("find_jobs", {"status": status, "node_id": node_id, "text": text, "limit": limit,
                                               **page_params(before)})

    async def _job_state(self, job_id: str | RawText) -> tuple[Any, ...] | None:
        rows = list(await self._conn.execute_fetchall(Q["job_state"], {"id": job_id}))
        return tuple(rows[0]) if rows else None

    async def _job_output(self, job_id: str | RawText, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = await self._dicts("job_output_since", {"id": job_id, **params})
        return rows[0] if rows else None

    async def job_timings(self, *, since_ms: int, limit: int) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self._conn.execute_fetchall(Q["job_timings"],
                                                                          {"since": since_ms, "limit": limit})]

    async def _dicts(self, query: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        async with self._conn.execute(Q[query], params) as cursor:
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]

    async def stranded_jobs(self, *, limit: int) -> tuple[int, list[dict[str, Any]]]:
        rows = list(await self._conn.execute_fetchall(Q["stranded_jobs"], {"limit": limit}))
        return (rows[0][3] if rows else 0), [{"id": r[0], "status": r[1], "worker_id": r[2]} for r in rows]

    async def prune_workers(self, *, older_than_ms: int = WORKERS_KEPT_MS, keep: int = WORKERS_KEPT) -> int:
        return await self._write_count("prune_workers", {"older_than_ms": older_than_ms, "keep": keep})



def _kept_result(params: Mapping[str, Any], row: sqlite3.Row) -> dict[str, Any]:
    """A finish as a report beside the file keeps it (rewrites.Pending): what the row became (`status`: queued
    again, or final) and when, from the row just written (id, status, duration, started_at, completed_at)."""
    keys = ("id", "worker_id", "attempt", "uncount", "exit_code", "error", "stdout", "stderr", "stdout_bytes",
            "stderr_bytes", "run_after")
    return {k: params[k] for k in keys} | {"status": row[1], "started_at": row[3], "ended_at": row[4]}


def _applied_params(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """A kept result as apply_kept_result's parameters; None if it is not one (a line edited by hand)."""
    def number(key: str) -> int | None:
        value = result.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def text(key: str) -> str | None:
        value = result.get(key)
        return value if isinstance(value, str) else None

    status, attempt = result.get("status"), number("attempt")
    if status not in ("queued", "completed", "failed", "cancelled") or attempt is None or text("id") is None:
        return None
    final = status != "queued"
    return {"id": text("id"), "status": status, "attempt": attempt - (1 if result.get("uncount") else 0),
            "worker_id": text("worker_id"), "exit_code": number("exit_code"), "error": text("error"),
            "stdout": text("stdout"), "stderr": text("stderr"), "stdout_bytes": number("stdout_bytes"),
            "stderr_bytes": number("stderr_bytes"), "run_after": None if final else number("run_after"),
            "started_at": number("started_at") if final else None, "ended_at": number("ended_at") if final else None}


def _claim_order(row: sqlite3.Row) -> tuple[int, int, int]:
    """priority DESC, created_at, rowid; a non-integer (a bad row) sorts first so it fails fast."""
    priority, created_at, rowid = row[6], row[-2], row[-1]
    if not isinstance(priority, int) or not isinstance(created_at, int):
        return (-(2**63), 0, rowid)
    return (-priority, created_at, rowid)


class _Nulls(dict[str, Any]):
    """Statement parameters that are all NULL, whatever their names."""

    def __missing__(self, key: str) -> None:
        return None


def _is_big(text: str | None) -> bool:
    return text is not None and len(text) >= _BIG_TEXT


def _output_params(claim: Claim, out: OutputSnapshot) -> dict[str, Any]:
    return {"id": claim.job_id, "worker_id": claim.worker_id, "attempt": claim.attempt,
            "stdout": out.stdout, "stderr": out.stderr,
            "stdout_bytes": out.stdout_bytes, "stderr_bytes": out.stderr_bytes}
