"""The one store interface the dispatcher, runner, lease, health and CLI talk to, whatever the database behind it.

Two backends implement it: daemon.store.sqlite (the embedded default) and daemon.store.postgres (several hosts).
"""

from __future__ import annotations

import abc
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon import logging as log
from daemon.config import POSTGRES_SCHEMES
from daemon.errors import DatabaseError, DatabaseRewritten
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
)

MARKER_ROOM = 64  # job_output_since: the output cap's marker starts at most this far before its TOTAL part
CAP_HEAD_SHARE = 4  # daemon.output.HEAD_SHARE: the marker lies in the first 1/4 of a column the cap cut
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


JOB_STATE = ("status", "attempt", "stdout_bytes", "stderr_bytes", "duration", "worker_id", "exit_code")


def job_state(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What job_output_since's `known` compares: a change of any of these is a change a follower must see."""
    return tuple(row.get(key) for key in JOB_STATE)


def page_params(before: tuple[int, str] | None) -> dict[str, Any]:
    """find_jobs' keyset: the page after the row (created_at, id)."""
    created, after_id = before if before is not None else (None, None)
    return {"before_created": created, "before_id": after_id}


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


class Store(abc.ABC):
    """Every SQL statement the daemon and the CLI run, as methods; every status change a compare-and-set."""

    name: str  # the database as a user names it (a path, or a URL without its password), for messages
    path: Path | None = None  # the database file, for a backend that has one
    read_only = False  # opened read-only (a command that only reads, or a file this user may not write)
    write_denied: str | None = None  # why this user may not write it, when that is why it was opened read-only
    read_only_fs: Path | None = None  # the mount point, when that is why: its filesystem is mounted read-only
    # Daemons on other hosts share it: they may recover this host's jobs, and cannot kill what runs here.
    shared_by_hosts = False

    # -- lifecycle, schema ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Create the base schema where missing and apply the daemon's pending migrations; idempotent."""

    @abc.abstractmethod
    async def check(self) -> list[str]:
        """Problems that would stop the daemon or other programs from using the database; empty when fine."""

    @abc.abstractmethod
    async def backup(self, target: Path) -> None: ...

    # -- noticing other programs' writes ------------------------------------------------------------------

    @abc.abstractmethod
    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """What tells the daemon that the queue may have changed; `poll_s`: the configured safety poll."""

    @property
    def unwritable(self) -> str | None:
        """Why nothing more may be written to the store (another program rewrote its file), or None."""
        return None

    async def quarantine(self, *, running: Sequence[Mapping[str, Any]], worker: Mapping[str, Any]) -> Quarantine:
        """Stop writing to a file another program rewrote, set our writes aside, and report: which attempts were
        `running` ({id, attempt, node_id, started_at, pid, pid_start}) under `worker` (its lease identity), for
        the next daemon to find them again."""
        raise DatabaseError(f"{self.name}: only a SQLite file can be rewritten by another program")

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After quarantine: results of attempts that ended since, kept beside the file (OSError if they cannot)."""
        raise DatabaseError(f"{self.name}: only a SQLite file can be rewritten by another program")

    async def apply_set_aside(self) -> list[dict[str, Any]]:
        """At start-up: what daemons kept beside the file when another program rewrote it, applied to the file as
        it is now (results recorded, claims of attempts that may still run restored for recovery). What was done,
        one entry per job."""
        return []

    def writes_settled(self) -> bool:
        """Would all that was written so far survive another program rewriting the file (it is in the main file,
        not only in a WAL)? Until then, what ran is kept where it ran (the keeper, the node's spool)."""
        return True


    async def idle(self) -> None:  # noqa: B027 -- a no-op unless the backend keeps something for later
        """The daemon is idle, or has just written big rows: give back what the driver holds (memory), and settle
        what was written (writes_settled)."""

    # -- the daemon's side ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def fail_malformed(self) -> list[tuple[Any, str]]: ...

    @abc.abstractmethod
    async def fail_unknown_nodes(self, node_ids: Sequence[str]) -> list[tuple[str, Any]]: ...

    @abc.abstractmethod
    async def claim(self, node_id: str, limit: int, worker_id: str) -> list[ClaimedJob]: ...

    @abc.abstractmethod
    async def write_outputs(self, updates: Iterable[tuple[Claim, OutputSnapshot, ProcessRef | None]]) -> None: ...

    @abc.abstractmethod
    async def finish_many(self, items: Sequence[tuple[Claim, JobResult]]
                          ) -> dict[str, tuple[JobStatus, int | None]]:
        """Record the end of several jobs in one transaction. Returns job id -> (the row's status now, duration
        ms or None if re-queued) for the writes that took; a job missing from it is no longer ours."""

    @abc.abstractmethod
    async def fail_blocked_dependencies(self) -> list[tuple[str, Any]]: ...

    @abc.abstractmethod
    async def fail_dependency_cycles(self) -> list[tuple[str, Any]]: ...

    @abc.abstractmethod
    async def has_dependents(self) -> bool: ...

    @abc.abstractmethod
    async def next_run_after(self) -> int | None: ...

    @abc.abstractmethod
    async def cancelled_among(self, job_ids: Iterable[str], worker_id: str) -> list[tuple[str, int]]: ...

    # -- leases and recovery --------------------------------------------------------------------------------

    @abc.abstractmethod
    async def register_worker(self, *, worker_id: str, host: str, boot_id: str | None, pid: int,
                              pid_start: int | None, nodes: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def heartbeat(self, worker_id: str) -> bool:
        """Renew our lease; False means another daemon declared us dead and took our jobs."""

    @abc.abstractmethod
    async def other_workers(self, worker_id: str) -> list[Worker]: ...

    @abc.abstractmethod
    async def stop_worker(self, worker_id: str, reason: str) -> bool:
        """Mark a worker stopped; True for the one caller that did it (and so recovers its jobs)."""

    @abc.abstractmethod
    async def orphaned_jobs(self, worker_id: str) -> list[OrphanedJob]: ...

    @abc.abstractmethod
    async def resolve_orphan(self, worker_id: str, job: OrphanedJob, *, requeue: bool, error: str) -> bool: ...

    @abc.abstractmethod
    async def adopt(self, old_worker_id: str, job: OrphanedJob, worker_id: str) -> AdoptedJob | None: ...

    @abc.abstractmethod
    async def detached_jobs(self, node_ids: Sequence[str]) -> list[tuple[str, str, str | None, OrphanedJob]]: ...

    @abc.abstractmethod
    async def finished_attempts(self, node_id: str) -> list[tuple[str, int]]: ...

    @abc.abstractmethod
    async def live_daemons_serving(self, node_id: Any, *, lease_ttl_ms: int) -> int: ...

    # -- nodes ----------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def upsert_nodes(self, nodes: Sequence[tuple[str, str, str | None]]) -> None: ...

    @abc.abstractmethod
    async def node_heartbeats(self, beats: Mapping[str, tuple[str, str]], served: Sequence[str]) -> list[str]: ...

    @abc.abstractmethod
    async def fail_node_jobs(self, node_id: str, error: str, *, queued_before: int | None = None) -> list[str]: ...

    @abc.abstractmethod
    async def nodes_overview(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def job_counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def queue_by_node(self) -> dict[tuple[str, str], int]: ...

    @abc.abstractmethod
    async def heartbeat_ages(self) -> dict[str, int]: ...

    # -- the CLI's side -------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def insert_job(self, *, node_id: str, tool: str, command: str, cwd: str | None = None,
                         env: dict[str, str] | None = None, priority: int = 0, timeout_ms: int | None = None,
                         max_attempts: int = 1, delay_ms: int | None = None,
                         depends_on: str | RawText | None = None, conversation_id: str | None = None,
                         message_id: str | None = None) -> str:
        """Queue a job as other programs do; `delay_ms` after its created_at, both by the database's clock.
        `conversation_id`, `message_id`: NexusCLI's links to its chat (rows of its own tables, or None)."""

    @abc.abstractmethod
    async def prune(self, *, older_than_ms: int, statuses: Sequence[str]) -> int: ...

    @abc.abstractmethod
    async def retry(self, job_id: str | RawText) -> bool: ...

    @abc.abstractmethod
    async def workers(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def cancel(self, job_ids: Sequence[str | RawText]) -> list[str | RawText]: ...

    @abc.abstractmethod
    async def resolve_id(self, prefix: str) -> str | RawText: ...

    @abc.abstractmethod
    async def get_job(self, job_id: str | RawText) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def list_jobs(self, *, status: str | None, node_id: str | None, limit: int) -> list[dict[str, Any]]: ...

    # -- housekeeping: rows no daemon runs, stopped daemons ---------------------------------------------------

    @abc.abstractmethod
    async def stranded_jobs(self, *, limit: int) -> tuple[int, list[dict[str, Any]]]:
        """Rows no daemon of this database will run or finish: a status none of the contract's (a typo on a table
        without CHECK constraints), or `executing` under no registered daemon. How many, and the first `limit`
        of them (id, status, worker_id). `cancel` ends them and `retry` queues them again."""

    @abc.abstractmethod
    async def prune_workers(self, *, older_than_ms: int = WORKERS_KEPT_MS, keep: int = WORKERS_KEPT) -> int:
        """Forget daemons that stopped more than `older_than_ms` ago, but the `keep` that started last and any that
        still holds an unfinished job (recovery needs it); how many were forgotten."""

    # -- the web console's side (daemon.web) --------------------------------------------------------------

    @abc.abstractmethod
    def row_watcher(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """Like `changes`, but for every change of a job or node row (output, status, heartbeats), by anyone."""

    @abc.abstractmethod
    async def find_jobs(self, *, status: str | None, node_id: str | None, text: str | None,
                        before: tuple[int, str] | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, without the output: filtered by status, node and `text` (in the command or the error,
        any case, or the start of the id), after the page that ended at `before` = (created_at, id)."""

    async def job_output_since(self, job_id: str | RawText, *, stdout_from: int, stderr_from: int, max_bytes: int,
                               known: tuple[Any, ...] | None = None,
                               hints: tuple[int, int] = (-1, -1)) -> dict[str, Any] | None:
        """A followed job: its row without the output, and per stream (`stdout_`, `stderr_` keys): `length`, the
        column's length in UTF-8 bytes; `chunk`, its bytes from `start` on (at most `max_bytes`): from the column
        offset `*_from`, or where `*_from` < 0, from the stream's byte -`*_from` counted back from the column's end
        (a column the output cap cut ends where the stream does); `around`, the bytes from `around_at` on that hold
        the cap's marker (daemon.output): at `hints` (where it was) if >= 0, else found by its " bytes of STREAM
        omitted; TOTAL bytes in all]" with the row's own TOTAL (none: None and -1). `known`: the row's `state`
        (job_state) as the caller last saw it: while the row still has it, only {"state": ...} is read."""
        if known is not None:
            state = await self._job_state(job_id)
            if state is None or state == known:
                return None if state is None else {"state": known}
        row = await self._job_output(job_id, {"stdout_from": stdout_from, "stderr_from": stderr_from,
                                              "max": max_bytes, "room": MARKER_ROOM, "head_share": CAP_HEAD_SHARE,
                                              "stdout_hint": hints[0], "stderr_hint": hints[1]})
        return None if row is None else row | {"state": job_state(row)}

    @abc.abstractmethod
    async def _job_state(self, job_id: str | RawText) -> tuple[Any, ...] | None:
        """job_state's columns of the row, read without its output (the `job_state` query)."""

    @abc.abstractmethod
    async def _job_output(self, job_id: str | RawText, params: dict[str, Any]) -> dict[str, Any] | None:
        """The `job_output_since` query with these parameters and the id."""

    @abc.abstractmethod
    async def job_timings(self, *, since_ms: int, limit: int) -> list[tuple[Any, ...]]:
        """(created_at, run_after, started_at, completed_at, status) of the jobs created or finished since
        `since_ms`, and of every job still queued or running: the most recent `limit` of them."""


def cycles(edges: Mapping[str, str]) -> list[list[str]]:
    """The cycles of a graph in which each node has one edge at most, each in the order of its edges."""
    state: dict[str, int] = {}  # absent: not seen; 1: on the current walk; 2: done
    found = []
    for start in edges:
        walk: list[str] = []
        node: str | None = start
        while node is not None and node in edges and state.get(node) is None:
            state[node] = 1
            walk.append(node)
            node = edges[node]
        if node is not None and state.get(node) == 1:  # the walk came back to itself: a cycle from there
            found.append(walk[walk.index(node):])
        for visited in walk:
            state[visited] = 2
    return found
