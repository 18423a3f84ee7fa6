"""Everything SQL, behind one interface (base.Store) with two backends: sqlite/ (the embedded default) and
postgres/ (daemons on several hosts sharing one queue). Each backend keeps its SQL in its own named-queries file.

Nothing outside this package imports a database driver; the PostgreSQL one is imported only for a URL.
"""

from __future__ import annotations

from pathlib import Path

from daemon.model import (
    STRANDED_FIX,
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
    stranded,
)
from daemon.store.base import (
    WORKERS_KEPT_MS,
    ChangeSource,
    DbError,
    DbRejected,
    DbUnavailable,
    Store,
    is_postgres,
    survive_db_errors,
)
from daemon.store.sqlite import guard, rewrites

__all__ = [
    "STRANDED_FIX",
    "WORKERS_KEPT_MS",
    "AdoptedJob",
    "ChangeSource",
    "Claim",
    "ClaimedJob",
    "DbError",
    "DbRejected",
    "DbUnavailable",
    "JobResult",
    "JobStatus",
    "OrphanedJob",
    "OutputSnapshot",
    "ProcessRef",
    "Quarantine",
    "RawText",
    "Store",
    "Worker",
    "guard",
    "is_postgres",
    "now_ms",
    "open_store",
    "rewrites",
    "stranded",
    "survive_db_errors",
]


async def open_store(target: str | Path, *, busy_timeout_ms: int = 5000, create: bool = True, daemon: bool = False,
                     read_only_ok: bool = False, reads_only: bool = False, take_over: bool = False) -> Store:
    """The backend `target` names: a `postgresql://` URL, or else a SQLite file. Here, at the package's face and
    not in base.py, so that the interface does not import its backends. The PostgreSQL driver is imported only for
    a URL: the SQLite default never loads it."""
    if is_postgres(target):
        from daemon.store.postgres import PostgresStore

        return await PostgresStore.connect(str(target), create=create, daemon=daemon)
    from daemon.store.sqlite import SqliteStore

    return await SqliteStore.open_file(Path(target), busy_timeout_ms=busy_timeout_ms, create=create, daemon=daemon,
                                       read_only_ok=read_only_ok, reads_only=reads_only, take_over=take_over)
