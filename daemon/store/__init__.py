"""Everything SQL, behind one interface (base.Store) with two backends: sqlite/ (the embedded default) and
postgres/ (daemons on several hosts sharing one queue). Each backend keeps its SQL in its own named-queries file.

Nothing outside this package imports a database driver; the PostgreSQL one is imported only for a URL.
"""

from __future__ import annotations

from daemon.store.base import (
    ChangeSource,
    DbError,
    DbUnavailable,
    Quarantine,
    Store,
    is_postgres,
    now_ms,
    survive_db_errors,
)
from daemon.store.rows import (
    AdoptedJob,
    Claim,
    ClaimedJob,
    JobResult,
    JobStatus,
    OrphanedJob,
    OutputSnapshot,
    ProcessRef,
    RawText,
    Worker,
)
from daemon.store.sqlite import guard

__all__ = ["AdoptedJob", "ChangeSource", "Claim", "ClaimedJob", "DbError", "DbUnavailable", "JobResult",
           "JobStatus", "OrphanedJob", "OutputSnapshot", "ProcessRef", "Quarantine", "RawText", "Store", "Worker",
           "guard", "is_postgres", "now_ms", "survive_db_errors"]
