"""What the job store and both backends' drivers share: the errors callers may catch, the change source's
interface, and what a periodic duty does when the database says no.
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from daemon import logging as log
from daemon.config import POSTGRES_SCHEMES
from daemon.errors import DatabaseError, DatabaseRewritten

logger = log.get("store")
# A stopped daemon's record in jobd_workers is dropped this long after it stopped (at start-up and by `prune`),
# unless it still holds an unfinished job or is among the WORKERS_KEPT that started last.
WORKERS_KEPT_MS = 7 * 86_400_000
WORKERS_KEPT = 20


class DbUnavailable(DatabaseError):
    """The database server did not answer, or said no to one statement (PostgreSQL's errors, made ours): a
    transient failure the callers retry, as they do SQLite's."""


class DbRejected(DatabaseError):
    """The database refused the values of one write (a number out of range, a text too big, a constraint): writing
    the same again cannot help. The caller fails that row alone, with the reason, instead of retrying for ever."""


# What callers outside the store may catch: the database said no (transient or not), on either backend.
DbError: tuple[type[Exception], ...] = (sqlite3.Error, DbUnavailable, DbRejected)


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


@contextlib.asynccontextmanager
async def survive_db_errors(what: str, on_error: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """For a periodic duty (heartbeats, status, retention): a database error (disk full, I/O, a lost connection)
    skips this round, logged (and `on_error` called: the metrics count it), instead of taking the daemon and its
    running jobs down. The next round tries again."""
    try:
        yield
    except DbError as e:
        logger.error("db.write_failed", what=what, error=str(e))
        if on_error is not None:
            on_error()
    except DatabaseRewritten:
        pass  # the dispatcher says so, once, with what to do; nothing more is written


class ChangeSource(abc.ABC):
    """Calls its `on_change` (on the event loop) when the queue may have changed: another program queued or
    cancelled a job, or the store can no longer be written (`Store.unwritable`). How it knows (inotify and
    SQLite's data_version, LISTEN/NOTIFY, a safety poll) is the backend's business."""

    @property
    @abc.abstractmethod
    def uses_push(self) -> bool:
        """True when changes are pushed (inotify, LISTEN); False: it can only poll."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...
