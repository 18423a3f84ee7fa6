"""Opening a SQLite file for the driver: permissions and read-only filesystems, read-only opens for commands that
only read, a WAL left beside a file another program rewrote, another program's database, and WAL mode.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import sqlite3
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import aiosqlite

from daemon import logging as log
from daemon.errors import DatabaseError, DatabaseRewritten, WholeFileWriter
from daemon.model import RawText, now_ms
from daemon.store.sqlite import guard, rewrites, schema
from daemon.store.sqlite.driver import SqliteDriver

logger = log.get("store")


async def open_file(path: Path, *, busy_timeout_ms: int = 5000, create: bool = True, daemon: bool = False,
                    read_only_ok: bool = False, reads_only: bool = False, take_over: bool = False) -> SqliteDriver:
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
    denied = _write_denied(path)
    if not denied:
        _set_aside_stale_wal(path)
    if ((denied and read_only_ok) or reads_only) and os.access(path, os.R_OK):
        driver = await _open_read_only(path, busy_timeout_ms, denied)
        if driver is not None:
            return driver
    if denied:
        raise DatabaseError(_permissions_problem(path, denied))
    if (mount := read_only_mount(path)) is not None:  # no file yet: nothing can create it
        raise DatabaseError(_read_only_fs_problem(path, mount))
    return await _open_writable(path, busy_timeout_ms, create=create, daemon=daemon,
                                take_over=take_over or _says_wal(path))


async def _open_writable(path: Path, busy_timeout_ms: int, *, create: bool, daemon: bool,
                         take_over: bool) -> SqliteDriver:
    try:
        if create:
            _create_private(path)
        conn = await aiosqlite.Connection(_connector(path), iter_chunk_size=64)
    except (OSError, sqlite3.Error) as e:
        raise DatabaseError(f"{path}: cannot open the database: {e}") from e
    _read_rows(conn)
    try:
        problems = await _configure(conn, path, busy_timeout_ms, take_over=take_over)
        if daemon:
            await conn.execute("PRAGMA wal_autocheckpoint = 0")
    except DatabaseRewritten:
        await conn.close()
        raise
    except sqlite3.Error as e:
        await conn.close()
        raise DatabaseError(f"{path}: not a usable SQLite database: {e}{_readonly_hint(e)}") from e
    if problems:
        await conn.close()
        raise DatabaseError(_unusable(path, problems))
    return SqliteDriver(conn, path, daemon=daemon, rewrite_guard=guard.RewriteGuard(path))


async def _configure(conn: aiosqlite.Connection, path: Path, busy_timeout_ms: int, *, take_over: bool) -> list[str]:
    """Settings of our connection, and WAL for the file; first, what makes the file unusable (another program's
    `jobs`), returned with nothing changed, and a whole-file writer's file refused (DatabaseRewritten) unless
    `take_over`."""
    await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if problems := await schema.unusable(conn):
        return problems
    if not take_over and (tables := guard.whole_file_writer(set(await schema.kinds(conn)))):
        raise WholeFileWriter(guard.whole_file_writer_message(path, tables))
    rows = await conn.execute_fetchall("PRAGMA journal_mode = WAL")
    mode = next(iter(rows))[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"journal_mode is {mode!r}, WAL could not be enabled")
    # NORMAL is durable across a crash of any process in WAL mode; only a power cut can lose a last commit.
    await conn.execute("PRAGMA synchronous = NORMAL")
    await conn.execute("PRAGMA foreign_keys = ON")
    # A burst of output can grow the WAL to hundreds of MB; give the space back after checkpoints.
    await conn.execute("PRAGMA journal_size_limit = 67108864")
    return []


async def _open_read_only(path: Path, busy_timeout_ms: int, denied: str | None) -> SqliteDriver | None:
    """For commands that only read: no switch to WAL, no migration, no write, so no WAL left behind. A file this
    user may not write (`denied` says why): with a -wal beside it (a writer at work), or in rollback-journal
    mode, through SQLite's read-only mode, which reads that WAL; a WAL-mode file without one has everything in
    it: read as it stands (immutable), since read-only mode would create a -wal and -shm owned by this user,
    which the file's owner then could not write. A file this user may write: read-only mode (it sees what
    daemons write meanwhile); None if the file needs a migration first, which only a writable open does."""
    wal = denied is None or os.path.exists(f"{path}-wal") or not guard.read_header(path).says_wal  # noqa: ASYNC240
    uri = Path(path).absolute().as_uri() + ("?mode=ro" if wal else "?immutable=1")  # noqa: ASYNC240 -- no I/O
    why = _permissions_problem(path, denied) if denied else f"{path}: cannot open the database to read it"
    try:
        conn = await aiosqlite.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as e:
        raise DatabaseError(f"{why}. Reading it failed too: {e}") from e
    _read_rows(conn)
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        if problems := await schema.unusable(conn):
            raise DatabaseError(_unusable(path, problems))
        if (problems := await schema.not_migrated(conn)) and denied is None:
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
    driver = SqliteDriver(conn, path)
    driver.read_only, driver.write_denied, driver.read_only_fs = True, denied, read_only_mount(path)
    return driver


def _read_rows(conn: aiosqlite.Connection) -> None:
    """Rows that know their columns' names (sqlite3.Row, in C), and text that is not valid UTF-8 (another program
    wrote raw bytes) as RawText instead of failing the whole query: the row it is in then fails alone, with a
    reason (claim, daemon.tools)."""
    conn.row_factory = sqlite3.Row
    conn.text_factory = _text_or_bytes


def _text_or_bytes(data: bytes) -> str | RawText:
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


def _says_wal(path: Path) -> bool:
    """The file's header says WAL (or there is no file yet to be another program's)."""
    try:
        header = guard.read_header(path)
    except OSError:
        return True
    return header.says_wal or not header.raw


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


def _create_private(path: Path) -> None:
    """A new database is readable and writable by its owner only: writing it means running commands. Where a link
    leads (O_EXCL would refuse the link itself, and SQLite would then create the file with the umask's mode)."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


# -- what stands in the way: permissions, a read-only filesystem ------------------------------------------------

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


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _described(path: Path) -> str:
    st = path.stat()
    return f"{path} (owned by {_user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o})"


def _write_denied(path: Path) -> str | None:
    """What this user may not write or read: the file, a -wal/-shm beside it, or the directory SQLite creates
    those in. None when nothing stands in the way, or when there is no file yet (creating it says why not)."""
    path = Path(path)
    if not path.exists():
        return None
    if (mount := read_only_mount(path)) is not None:
        return f"the filesystem at {mount} is mounted read-only"
    try:
        me = f"{_user(os.geteuid())} (uid {os.geteuid()})"
        if not os.access(path, os.R_OK):
            return f"user {me} may not read {_described(path)}"
        if not os.access(path, os.W_OK):
            return f"user {me} may not write {_described(path)}"
        sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
        for sidecar in sidecars:
            if sidecar.exists() and not os.access(sidecar, os.W_OK):
                return f"user {me} may not write {_described(sidecar)}, which SQLite keeps beside the database"
        directory = path.absolute().parent
        if not os.access(directory, os.W_OK | os.X_OK) and not all(s.exists() for s in sidecars):
            return (f"user {me} may not write the directory {_described(directory)}, where SQLite creates "
                    f"{path.name}-wal and {path.name}-shm beside the database")
    except FileNotFoundError:
        return None
    return None


def _permissions_problem(path: Path, denied: str) -> str:
    if (mount := read_only_mount(path)) is not None:
        return _read_only_fs_problem(path, mount)
    try:
        owner_uid = os.stat(path).st_uid
    except OSError:
        owner_uid = -1
    if owner_uid == os.geteuid():
        fix = "Give this user write access there (chmod/chown), or move the database where it may write"
    else:
        owner = _user(owner_uid) if owner_uid >= 0 else "the database's owner"
        fix = (f"Run nexus-jobd as {owner} (e.g. `sudo -u {owner} nexus-jobd ...`), or give this user write "
               "access (chown/chmod)")
    return (f"{path}: a permissions problem: {denied}. {fix}; commands that only read (ps, show, logs, status, "
            "nodes, backup, db check) need only read access to the file")


def _readonly_hint(error: sqlite3.Error) -> str:
    if "readonly" not in str(error) and "unable to open" not in str(error):
        return ""
    return (" (a permissions problem: this user may not write the file, or the directory SQLite keeps its -wal "
            "and -shm in)")


def _unusable(path: Path, problems: Sequence[str]) -> str:
    return (f"{path}: not a usable database: {'; '.join(problems)}. It is not the jobs database of NexusCLI or "
            "nexus-jobd (nothing was changed): check --db / NEXUS_JOBD_DB")
