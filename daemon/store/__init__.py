"""Everything SQL: one job store (jobs.JobStore, the domain operations written once) over a narrow driver per
backend (driver.Driver): sqlite/ (the embedded default) and postgres/ (daemons on several hosts sharing one queue),
each with its SQL in its own named-queries file, its dialect hooks and its change source.

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
    is_postgres,
    survive_db_errors,
)
from daemon.store.jobs import JobStore
from daemon.store.sqlite import guard, rewrites

Store = JobStore  # the name the rest of the daemon knows the store by

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
    "JobStore",
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
                     read_only_ok: bool = False, reads_only: bool = False, take_over: bool = False) -> JobStore:
    """The store over the backend `target` names: a `postgresql://` URL, or else a SQLite file. Here, at the
    package's face, so that the store does not import its backends. The PostgreSQL driver is imported only for a
    URL: the SQLite default never loads it."""
    if is_postgres(target):
        from daemon.store.postgres.driver import PostgresDriver

        return JobStore(await PostgresDriver.connect(str(target), create=create))
    from daemon.store.sqlite.opening import open_file

    return JobStore(await open_file(Path(target), busy_timeout_ms=busy_timeout_ms, create=create, daemon=daemon,
                                    read_only_ok=read_only_ok, reads_only=reads_only, take_over=take_over))
