"""The database file under SQLite: notice another program rewriting it outside SQLite's locking, and never let a
stale WAL be replayed onto a file it does not belong to.

A writer that keeps the database in memory and writes the whole file back (sql.js, NexusCLI 0.10's driver) ignores
SQLite's locks. While the daemon holds the file in WAL mode, such a rewrite shows as a header that no longer says
WAL, another inode at the path, or a file that shrank; from then on, any checkpoint of our WAL (at a commit, or when
the last connection closes) would write our pages over the other program's file. Every check here is one stat and
one 100-byte read.

POSIX locks belong to the process, and closing ANY descriptor of a file drops all of them: SQLite's own locks on
the database and its `-shm` included. So while SQLite has the database open, this module reads through
descriptors it opened once and keeps until the store closes; it never opens and closes those files again.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sqlite3
import struct
from dataclasses import dataclass
from pathlib import Path

from daemon.errors import DatabaseRewritten

__all__ = ["DatabaseRewritten", "RewriteGuard", "no_checkpoint_on_close", "rewritten_message", "set_aside",
           "stale_wal", "whole_file_writer", "whole_file_writer_message"]

HEADER_BYTES = 100
_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_HEADER = struct.Struct(">IIIIII")  # magic, version, page size, checkpoint seq, salt-1, salt-2 (+ checksums)
_FIRST_FRAME = 32  # the WAL header's size
_FRAME_SALTS = struct.Struct(">II")  # at byte 8 of each 24-byte frame header
_SHM_MXFRAME = struct.Struct("=I")  # native byte order: the WAL index lives in shared memory
_SHM_NBACKFILL_AT = 96
_NO_CKPT_ON_CLOSE = 1006  # SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE

WHY = ("a program that keeps the whole database in memory and writes the file back, such as sql.js, the driver "
       "of every published NexusCLI release (0.5 to 0.10)")
FIX = ("let only programs that use SQLite's own locking write this file (better-sqlite3, node:sqlite, Python's "
       "sqlite3, the sqlite3 shell), or give the daemon a database of its own; a NexusCLI release cannot share its "
       "database with the daemon (once it no longer writes the file: `nexus-jobd db take-over`)")
# Tables every published NexusCLI release creates at start (adapter.js initSchema, migrate.js), beside the
# contract's four: a file that has one of them was made by NexusCLI.
NEXUSCLI_TABLES = frozenset({"users", "login_attempts", "api_keys", "_migrations"})


@dataclass(frozen=True)
class Header:
    raw: bytes

    @property
    def is_sqlite(self) -> bool:
        return self.raw.startswith(_MAGIC)

    @property
    def says_wal(self) -> bool:
        return self.raw[18:20] == b"\x02\x02"

    @property
    def declared_size(self) -> int | None:
        """Page count times page size, when the header vouches for it (change counter == version-valid-for)."""
        if len(self.raw) < HEADER_BYTES or self.raw[24:28] != self.raw[92:96]:
            return None
        page_size = int.from_bytes(self.raw[16:18], "big")
        page_size = 65536 if page_size == 1 else page_size
        pages = int.from_bytes(self.raw[28:32], "big")
        return pages * page_size if pages else None


def read_header(path: Path) -> Header:
    """Only before SQLite opens `path` in this process (see the module docstring)."""
    with open(path, "rb") as f:
        return Header(f.read(HEADER_BYTES))


class RewriteGuard:
    """Remembers the file we opened in WAL mode and tells, cheaply, whether it is still that file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # kept open: see the module docstring
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino)
        self._size = st.st_size
        self._shm_fd: int | None = None
        self._shm_identity: tuple[int, int] | None = None

    def close(self) -> None:
        """Only after SQLite closed the database: closing these drops the process's locks on the files."""
        for fd in (self._fd, self._shm_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd, self._shm_fd = -1, None

    def problem(self) -> str | None:
        """What shows that another program rewrote the file, or None while it is still ours."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return f"{self.path} was deleted or moved away"
        except OSError:
            return None  # unreadable for a moment: the next look decides
        if (st.st_dev, st.st_ino) != self._identity:
            return f"another file was put at {self.path} (a new inode: the file was replaced, e.g. by mv)"
        try:
            header = Header(os.pread(self._fd, HEADER_BYTES, 0))
        except OSError:
            return None
        if not header.is_sqlite and st.st_size > 0:
            return f"{self.path} no longer starts with SQLite's header"
        if st.st_size < self._size and header.declared_size != st.st_size:
            # SQLite's own checkpoint after a VACUUM shrinks the file too, but to the size its header declares.
            return f"{self.path} shrank from {self._size} to {st.st_size} bytes"
        if header.is_sqlite and not header.says_wal:
            return (f"its header says rollback journal (bytes 18-19 = {header.raw[18]}, {header.raw[19]}) while "
                    "the daemon holds it in WAL mode")
        self._size = st.st_size
        return None

    def frames_not_checkpointed(self) -> int | None:
        """WAL frames not yet copied into the main file (the WAL index's mxFrame - nBackfill), None if unknown."""
        shm = f"{self.path}-shm"
        try:
            if self._shm_fd is None:
                self._shm_fd = os.open(shm, os.O_RDONLY | os.O_CLOEXEC)  # kept open, like the main file's
                st = os.fstat(self._shm_fd)
                self._shm_identity = (st.st_dev, st.st_ino)
            st = os.stat(shm)
            if (st.st_dev, st.st_ino) != self._shm_identity:
                return None  # another WAL index than the one we read: unknown (never closed: see above)
            data = os.pread(self._shm_fd, _SHM_NBACKFILL_AT + 4, 0)
        except OSError:
            return None
        if len(data) < _SHM_NBACKFILL_AT + 4:
            return None
        (max_frame,) = _SHM_MXFRAME.unpack_from(data, 16)
        (backfilled,) = _SHM_MXFRAME.unpack_from(data, _SHM_NBACKFILL_AT)
        return max(0, int(max_frame) - int(backfilled))


def whole_file_writer(tables: set[str]) -> list[str]:
    """NexusCLI's own tables among `tables` (asked of a file whose header does not say WAL): such a file was last
    written by a published NexusCLI release, whose sql.js cannot use WAL. Empty: not such a file."""
    return sorted(NEXUSCLI_TABLES & {t.lower() for t in tables})


def whole_file_writer_message(path: Path, tables: list[str]) -> str:
    return (f"{path} is NexusCLI's database (it has NexusCLI's tables {', '.join(tables)}) in rollback-journal mode, "
            "as every published NexusCLI release (0.5 to 0.10) writes it: their sql.js driver keeps the whole "
            "database in memory and writes the file back, taking none of SQLite's locks. No other program can share "
            "such a file (each would overwrite the other's writes), and turning it into WAL mode, as the daemon "
            "must, could corrupt it. Nothing was written to it. Either give the daemon a database of its own "
            "(--db, NEXUS_JOBD_DB or [database] path), or, once NexusCLI no longer writes this file (stopped for "
            "good, or a build that opens it through better-sqlite3 in WAL mode, as its DATABASE_SCHEMA.md designs), "
            f"take it over once: `nexus-jobd --db {path} db take-over`")


def rewritten_message(path: Path, reason: str) -> str:
    """What a user reads in the log, `nexus-jobd status` and systemd's status line."""
    return (f"{path} was rewritten by another program outside SQLite's locking ({reason}). Likely cause: {WHY}; "
            "such a writer cannot share the file with the daemon: each side overwrites the other's writes. The "
            "daemon stopped writing to the file and left it exactly as the other program wrote it. "
            f"Fix: {FIX}; then start the daemon again")


def stale_wal(path: Path) -> str | None:
    """The dangerous state at open: a main file whose header does not say WAL next to a `-wal` holding frames.
    SQLite opens any file with a `-wal` beside it in WAL mode and replays those frames onto it."""
    wal = Path(f"{path}-wal")
    try:
        header = read_header(path)
        with open(wal, "rb") as f:
            head = f.read(_FIRST_FRAME + 24)
    except FileNotFoundError:
        return None
    if header.says_wal or len(head) < _FIRST_FRAME + 24:
        return None
    magic, _version, _page, _seq, salt1, salt2 = _WAL_HEADER.unpack_from(head)
    if magic not in _WAL_MAGICS or _FRAME_SALTS.unpack_from(head, _FIRST_FRAME + 8) != (salt1, salt2):
        return None
    return (f"{path} says rollback journal in its header, but {wal} holds WAL frames written before: another "
            f"program rewrote the file outside SQLite's locking, most likely {WHY}. "
            f"Opening it would replay those old frames onto the other program's file and corrupt it")


def stale_wal_way_out(path: Path) -> str:
    return (f"Keep the file as the other program wrote it: move {path}-wal and {path}-shm aside (e.g. "
            f"`mv {path}-wal {path}-wal.stale; mv {path}-shm {path}-shm.stale`) while nothing has the database "
            f"open, then start the daemon again; and {FIX}")


def set_aside(path: Path, suffix: str, *, held_only: bool = False) -> list[Path]:
    """Rename our `-wal` and `-shm` so that no program ever replays them onto the rewritten file. `held_only`: only
    files this process has open. The file at `path` may be a new database another process already opened (it was
    deleted or replaced, then created again), and the `-wal` and `-shm` there then are that process's: moving them
    would take its live WAL from under it."""
    held = _held_files() if held_only else None
    moved = []
    for name in (f"{path}-wal", f"{path}-shm"):
        target = Path(f"{name}.{suffix}")
        with contextlib.suppress(FileNotFoundError):
            if held is not None and _identity(name) not in held:
                continue
            os.rename(name, target)
            moved.append(target)
    return moved


def _identity(name: str) -> tuple[int, int]:
    st = os.stat(name)
    return st.st_dev, st.st_ino


def _held_files() -> set[tuple[int, int]] | None:
    """(device, inode) of every file this process has open, or None where /proc cannot say (then all is ours)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return None
    held = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            held.add(_identity(f"/proc/self/fd/{fd}"))
    return held


def no_checkpoint_on_close(conn: sqlite3.Connection) -> None:
    """SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE: the last connection to close must not write the WAL into the main file
    (it may no longer be ours); the daemon checkpoints explicitly, after checking the file. Call it in the thread
    that owns `conn`."""
    setconfig = getattr(conn, "setconfig", None)  # Python >= 3.12
    if setconfig is not None:
        setconfig(_NO_CKPT_ON_CLOSE, True)
        return
    _db_config_by_handle(conn)


def _db_config_by_handle(conn: sqlite3.Connection) -> None:
    """Python 3.11 has no setconfig: call sqlite3_db_config on the connection's handle, the first field after the
    object header in CPython's connection struct; checked by asking SQLite for that handle's file name first."""
    import _sqlite3

    lib = ctypes.CDLL(_sqlite3.__file__)
    handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    lib.sqlite3_db_filename.restype = ctypes.c_char_p
    lib.sqlite3_db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    name = next(iter(conn.execute("PRAGMA database_list").fetchall()))[2]
    if not handle or lib.sqlite3_db_filename(handle, b"main") != os.fsencode(name):
        raise sqlite3.NotSupportedError("cannot reach this Python's SQLite handle to turn off checkpoint on close")
    done = ctypes.c_int(-1)
    lib.sqlite3_db_config.restype = ctypes.c_int
    rc = lib.sqlite3_db_config(ctypes.c_void_p(handle), ctypes.c_int(_NO_CKPT_ON_CLOSE), ctypes.c_int(1),
                               ctypes.byref(done))
    if rc != 0 or done.value != 1:
        raise sqlite3.NotSupportedError(f"SQLite refused SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE (rc {rc})")
