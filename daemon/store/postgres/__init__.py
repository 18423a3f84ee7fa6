"""The PostgreSQL backend: daemons on several hosts share one queue. Claims with FOR UPDATE SKIP LOCKED, wake-ups
by LISTEN/NOTIFY, every time from the database's clock. The only module that imports psycopg (the `postgres` extra),
and only when a postgresql:// URL is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from daemon import logging as log
from daemon.config import redact_secrets, redact_url
from daemon.errors import DatabaseError, JobdError
from daemon.model import (
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
from daemon.store.base import (
    WORKERS_KEPT,
    WORKERS_KEPT_MS,
    ChangeSource,
    DbRejected,
    DbUnavailable,
    Store,
    cycles,
    page_params,
)
from daemon.store.postgres.queries import HERE, Q, read_sql

try:
    import psycopg
    import psycopg.conninfo
except ImportError as e:  # pragma: no cover -- the message is the test
    raise DatabaseError("a postgresql:// URL needs the PostgreSQL driver: pip install 'nexus-jobd[postgres]' "
                        f"(psycopg 3) into nexus-jobd's environment ({e})") from e

T = TypeVar("T")
logger = log.get("store")
CHANNEL = "nexus_jobd"
ROWS_CHANNEL = "nexus_jobd_rows"  # every write to jobs and nodes: only the web console listens (migration 0004)
_BASE_COLUMNS = {
    "jobs": ("id", "conversation_id", "message_id", "node_id", "tool", "command", "status", "exit_code",
             "stdout", "stderr", "duration", "created_at", "started_at", "completed_at"),
    "nodes": ("id", "hostname", "ip_address", "status", "capabilities", "last_heartbeat", "created_at"),
    "conversations": ("id", "title", "created_at", "updated_at", "metadata"),
    "messages": ("id", "conversation_id", "role", "content", "created_at", "metadata"),
}
# libpq settings the daemon wants unless the URL says otherwise: give up on a dead server or a cut link in
# seconds (not the kernel's 15 minutes), so that the daemon says so and reconnects.
_DEFAULTS = {"connect_timeout": "5", "keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
             "keepalives_count": "3", "tcp_user_timeout": "10000", "application_name": "nexus-jobd"}
# SQLSTATE classes of a statement whose values the server refuses (data exception, integrity constraint, program
# limit exceeded): sending the same again fails the same way.
_REFUSED_VALUES = ("22", "23", "54")
# What libpq says when the other end answers, but not as PostgreSQL does (a web server, sshd, another database).
_NOT_POSTGRES = ("received invalid response to SSL negotiation", "expected authentication request from server")
STATEMENT_TIMEOUT_S = 30.0  # past this, a statement's connection is presumed dead: dropped, and a new one made
RECONNECT_MAX_S = 5.0


def _migrations() -> list[tuple[str, str]]:
    return [(path.stem, path.read_text(encoding="utf-8")) for path in sorted((HERE / "migrations").glob("*.sql"))]


def _no_nul(text: str | None) -> str | None:
    """PostgreSQL's TEXT cannot hold NUL; a job that prints one keeps the rest of its output (U+FFFD in its place)."""
    return text.replace("\0", "\ufffd") if text is not None and "\0" in text else text


def _output_params(claim: Claim, out: OutputSnapshot) -> dict[str, Any]:
    return {"id": claim.job_id, "worker_id": claim.worker_id, "attempt": claim.attempt,
            "stdout": _no_nul(out.stdout), "stderr": _no_nul(out.stderr),
            "stdout_bytes": out.stdout_bytes, "stderr_bytes": out.stderr_bytes}


def _claims(claims: Sequence[Claim]) -> dict[str, Any]:
    return {"ids": [c.job_id for c in claims], "attempts": [c.attempt for c in claims]}


def said(url: str, error: BaseException) -> str:
    """What psycopg (libpq) said, on one line, without the URL's passwords (a parse error quotes the URL)."""
    return redact_secrets(" ".join(str(error).split()), url)


def explain(url: str, error: Exception) -> str:
    """A connection failure as one line naming what to fix."""
    text = said(url, error)
    name = redact_url(url)
    if "password authentication failed" in text or "no password supplied" in text:
        fix = ("the server refused the password: set it in PGPASSWORD or a passfile (~/.pgpass, or PGPASSFILE), "
               "never in the config file")
    elif "does not exist" in text and "database" in text:
        fix = "the database does not exist: create it (createdb NAME, or CREATE DATABASE) or fix the URL's path"
    elif "role" in text and "does not exist" in text:
        fix = "the user does not exist on the server: fix the URL's user, or create the role"
    elif any(answer in text for answer in _NOT_POSTGRES):
        where = re.search(r'connection to server (?:at "([^"]+)"(?: \([^)]*\))?, port (\d+)|on socket "([^"]+)")',
                          text)
        who = (f"{where[1]}:{where[2]}" if where[1] else where[3]) if where else "the URL's host and port"
        fix = (f"the program answering at {who} is not a PostgreSQL server: check the URL's host and port "
               "(PostgreSQL's own is 5432)")
    elif isinstance(error, psycopg.ProgrammingError):  # libpq could not parse it: nothing was sent anywhere
        fix = "the URL is not valid libpq syntax: postgresql://USER@HOST:PORT/DB or postgresql:///DB?host=/socket/dir"
    else:
        fix = "check that the server runs and the URL's host and port reach it"
    return f"{name}: cannot connect to PostgreSQL: {text}; {fix}"


class PostgresStore(Store):
    """One connection for the daemon's statements (each transaction under a lock, since coroutines share it), made
    again when lost; a second one LISTENs (see _Listener)."""

    shared_by_hosts = True

    def __init__(self, url: str, conn: psycopg.AsyncConnection[Any]) -> None:
        self.url = url
        self.name = redact_url(url)
        self._conn: psycopg.AsyncConnection[Any] | None = conn
        self._lock = asyncio.Lock()
        self._closed = False
        self._reconnect_delay_s = 0.0

    @classmethod
    async def connect(cls, url: str, *, create: bool = True, daemon: bool = False) -> PostgresStore:
        """Connect at start-up: a wrong URL, a refused password, a missing database stop here, in one line.
        `create`: make the tables if missing (else a database without them is refused, as for a SQLite file)."""
        try:
            conn = await cls._new_connection(url)
        except psycopg.Error as e:
            raise DatabaseError(explain(url, e)) from None
        store = cls(url, conn)
        if not create and (missing := await store._missing_tables()):
            await store.close()
            raise DatabaseError(f"{store.name}: tables {', '.join(missing)} are missing: it is not a nexus-jobd "
                                "database yet; run `nexus-jobd db migrate` (or start the daemon), or check --db")
        if problems := await store._contract_problems():
            await store.close()
            raise DatabaseError(f"{store.name}: not a usable database: {'; '.join(problems)}. It is not the jobs "
                                "database of NexusCLI or nexus-jobd (nothing was changed): check --db")
        return store

    @staticmethod
    async def _new_connection(url: str) -> psycopg.AsyncConnection[Any]:
        given = psycopg.conninfo.conninfo_to_dict(url)
        extra = {k: v for k, v in _DEFAULTS.items() if k not in given}
        conninfo = psycopg.conninfo.make_conninfo(url, **extra)
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None

    # -- the connection: one statement or transaction at a time, made again when lost -------------------------

    @contextlib.asynccontextmanager
    async def _session(self, *, transaction: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, for one statement or (`transaction`) one transaction; psycopg's errors become
        DbUnavailable, which every caller already survives and retries; a broken connection is made again on
        the next use, with back-off."""
        async with self._lock:
            conn = await self._connected()
            try:
                async with asyncio.timeout(STATEMENT_TIMEOUT_S):
                    if transaction:
                        async with conn.transaction():
                            yield conn
                    else:
                        yield conn
            except (psycopg.Error, TimeoutError) as e:
                if isinstance(e, TimeoutError) or conn.broken or conn.closed:
                    self._drop(e)
                text = f"{self.name}: {said(self.url, e) or type(e).__name__}"
                if (getattr(e, "sqlstate", None) or "")[:2] in _REFUSED_VALUES:
                    raise DbRejected(text) from e
                raise DbUnavailable(text) from e

    async def _connected(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self._closed:
            raise DbUnavailable(f"{self.name}: the store is closed")
        await asyncio.sleep(self._reconnect_delay_s)
        try:
            self._conn = await self._new_connection(self.url)
        except psycopg.Error as e:
            self._reconnect_delay_s = min(max(self._reconnect_delay_s * 2, 0.1), RECONNECT_MAX_S)
            logger.warning("db.reconnect_failed", db=self.name, error=said(self.url, e),
                           retry_in_s=self._reconnect_delay_s)
            raise DbUnavailable(explain(self.url, e)) from e
        self._reconnect_delay_s = 0.0
        logger.info("db.reconnected", db=self.name)
        return self._conn

    def _drop(self, error: BaseException) -> None:
        if self._conn is not None:
            logger.error("db.connection_lost", db=self.name, error=said(self.url, error) or "timed out",
                         action="running jobs go on; their output is held and written once reconnected")
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                conn.pgconn.finish()  # no goodbye over a link that may be dead: that could wait for minutes

    async def _fetch(self, query: str, params: Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        async with self._session() as conn:
            cur = await conn.execute(Q[query], params or {})
            return await cur.fetchall() if cur.description is not None else []

    async def _count(self, query: str, params: Mapping[str, Any]) -> int:
        async with self._session() as conn:
            cur = await conn.execute(Q[query], params)
            return int(cur.rowcount)

    async def _dicts(self, query: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        async with self._session() as conn:
            cur = await conn.execute(Q[query], params or {})
            names = [d.name for d in cur.description or ()]
            return [dict(zip(names, row, strict=True)) for row in await cur.fetchall()]

    async def _transaction(self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        async with self._session(transaction=True) as conn:
            return await work(conn)

    # -- schema ---------------------------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        applied: list[str] = []

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(Q["migration_lock"])
            await conn.execute(read_sql("schema.sql").encode())  # bytes: a script of several statements, no params
            done = {row[0] for row in await (await conn.execute(Q["applied_migrations"])).fetchall()}
            for name, text in _migrations():
                if name not in done:
                    await conn.execute(text.encode())
                    await conn.execute(Q["record_migration"], {"name": name})
                    applied.append(name)

        await self._transaction(work)
        for name in applied:
            logger.info("db.migrated", migration=name, db=self.name)
        return applied

    async def _columns(self) -> dict[str, set[str]]:
        tables = [*_BASE_COLUMNS, "jobd_migrations", "jobd_workers"]
        found: dict[str, set[str]] = {}
        for table, column in await self._fetch("table_columns", {"tables": tables}):
            found.setdefault(table, set()).add(column)
        return found

    async def _missing_tables(self) -> list[str]:
        have = await self._columns()
        return [table for table in _BASE_COLUMNS if table not in have]

    async def _contract_problems(self) -> list[str]:
        kinds = dict(await self._fetch("table_kinds", {"tables": [*_BASE_COLUMNS, "jobd_migrations",
                                                                   "jobd_workers"]}))
        problems = [f"{name!r} is a {kind.lower()}, not a table" for name, kind in kinds.items()
                    if kind != "BASE TABLE"]
        have = await self._columns()
        for table, columns in _BASE_COLUMNS.items():
            if table in have and (missing := [c for c in columns if c not in have[table]]):
                problems.append(f"table {table!r} lacks the contract's columns {', '.join(missing)}")
        return problems

    async def check(self) -> list[str]:
        problems: list[str] = []
        have = await self._columns()
        for table, columns in _BASE_COLUMNS.items():
            if table not in have:
                problems.append(f"table {table!r} is missing (run `nexus-jobd db migrate`)")
            elif missing := [c for c in columns if c not in have[table]]:
                problems.append(f"table {table!r} lacks the contract's columns {', '.join(missing)}")
        if "jobd_migrations" in have:
            done = {row[0] for row in await self._fetch("applied_migrations")}
            if pending := [name for name, _ in _migrations() if name not in done]:
                problems.append(f"migrations not applied: {', '.join(pending)} (run `nexus-jobd db migrate`)")
        else:
            problems.append("the daemon's migrations table is missing (run `nexus-jobd db migrate`)")
        return problems

    async def backup(self, target: Path) -> None:
        raise DatabaseError(f"{self.name} is a PostgreSQL database: back it up with pg_dump")

    # -- wake-ups ---------------------------------------------------------------------------------------------

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        return _Listener(self.url, self.name, on_change, poll_s)

    # -- the daemon's side --------------------------------------------------------------------------------------

    async def fail_malformed(self) -> list[tuple[Any, str]]:
        """Queued rows no claim can take as they are; the column types refuse most of what SQLite lets another
        program store (a number as an id...), not an attempt out of range."""
        return [(row[0], row[1]) for row in await self._fetch("fail_malformed")]

    async def fail_unknown_nodes(self, node_ids: Sequence[str]) -> list[tuple[str, Any]]:
        known = ", ".join(node_ids)
        error = (f"unknown node: no daemon on this database serves it (this one serves {known}); set node_id to "
                 "a configured node")
        rows = await self._fetch("fail_unknown_nodes", {"nodes": list(node_ids), "error": error})
        return [(row[0], row[1]) for row in rows]

    async def claim(self, node_id: str, limit: int, worker_id: str) -> list[ClaimedJob]:
        rows = await self._fetch("claim_jobs", {"node_id": node_id, "limit": limit, "worker_id": worker_id})
        rows.sort(key=lambda row: (-row[6], row[11], row[0]))  # RETURNING promises no order: the claim's
        return [ClaimedJob(*row) for row in rows]

    async def write_outputs(self, updates: Iterable[tuple[Claim, OutputSnapshot, ProcessRef | None]]) -> None:
        params = [_output_params(claim, out) | {"pid": proc.pid if proc else None,
                                                  "pid_start": proc.start if proc else None}
                  for claim, out, proc in updates]
        if not params:
            return

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(Q["write_output"], params)

        await self._transaction(work)

    async def finish_many(self, items: Sequence[tuple[Claim, JobResult]]
                          ) -> dict[str, tuple[JobStatus, int | None]]:
        if not items:
            return {}
        params = []
        for claim, result in items:
            p = _output_params(claim, result.output)
            p.update(status=result.status.value, exit_code=result.exit_code, error=result.error,
                     run_after=result.run_after, uncount=int(result.uncount))
            params.append(p)
        requeues = [p for p, (_, result) in zip(params, items, strict=True) if result.requeue]
        args = _claims([claim for claim, _ in items]) | {"worker_id": items[0][0].worker_id}

        async def work(conn: psycopg.AsyncConnection[Any]) -> dict[str, tuple[JobStatus, int | None]]:
            ours = {row[0] for row in await (await conn.execute(Q["unfinished_claims"], args)).fetchall()}
            for p, (_, result) in zip(params, items, strict=True):  # now that the rows' locks are ours
                p["late_ms"] = result.late_ms()
            async with conn.cursor() as cur:
                if requeues:  # first: a requeue that does not take (the row was cancelled) is then finished
                    await cur.executemany(Q["requeue_job"], requeues)
                await cur.executemany(Q["finish_job"], params)
            rows = await (await conn.execute(Q["finished_claims"], args)).fetchall()
            return {row[0]: (JobStatus(row[1]), row[2]) for row in rows if row[0] in ours}

        return await self._transaction(work)

    async def fail_blocked_dependencies(self) -> list[tuple[str, Any]]:
        failed: list[tuple[str, Any]] = []
        while rows := await self._fetch("fail_blocked_dependencies"):
            failed += [(row[0], row[1]) for row in rows]
        return failed

    async def fail_dependency_cycles(self) -> list[tuple[str, Any]]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, Any]]:
            edges = {row[0]: row[1] for row in await (await conn.execute(Q["queued_dependencies"])).fetchall()}
            failed: list[tuple[str, Any]] = []
            for cycle in cycles(edges):
                error = f"dependency cycle: {' -> '.join([*cycle, cycle[0]])}; none of these jobs can ever start"
                for job_id in cycle:
                    cur = await conn.execute(Q["fail_in_cycle"], {"id": job_id, "error": error})
                    failed += [(row[0], row[1]) for row in await cur.fetchall()]
            return failed

        return await self._transaction(work)

    async def has_dependents(self) -> bool:
        return bool((await self._fetch("has_dependents"))[0][0])

    async def next_run_after(self) -> int | None:
        rows = await self._fetch("next_run_after")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def cancelled_among(self, job_ids: Iterable[str], worker_id: str) -> list[tuple[str, int]]:
        rows = await self._fetch("cancelled_among", {"ids": sorted(set(job_ids)), "worker_id": worker_id})
        return [(row[0], row[1]) for row in rows]

    async def register_worker(self, *, worker_id: str, host: str, boot_id: str | None, pid: int,
                              pid_start: int | None, nodes: Sequence[str]) -> None:
        await self._fetch("register_worker", {"id": worker_id, "host": host, "boot_id": boot_id, "pid": pid,
                                              "pid_start": pid_start, "nodes": json.dumps(list(nodes))})

    async def heartbeat(self, worker_id: str) -> bool:
        return bool(await self._fetch("heartbeat", {"id": worker_id}))

    async def other_workers(self, worker_id: str) -> list[Worker]:
        return [Worker(*row) for row in await self._fetch("other_workers", {"id": worker_id})]

    async def stop_worker(self, worker_id: str, reason: str) -> bool:
        return bool(await self._fetch("stop_worker", {"id": worker_id, "reason": reason}))

    async def orphaned_jobs(self, worker_id: str) -> list[OrphanedJob]:
        return [OrphanedJob(*row) for row in await self._fetch("orphaned_jobs", {"worker_id": worker_id})]

    async def resolve_orphan(self, worker_id: str, job: OrphanedJob, *, requeue: bool, error: str) -> bool:
        query = "requeue_orphan" if requeue else "fail_orphan"
        params = {"id": job.id, "worker_id": worker_id, "attempt": job.attempt, "error": error}
        return await self._count(query, params) == 1

    async def adopt(self, old_worker_id: str, job: OrphanedJob, worker_id: str) -> AdoptedJob | None:
        rows = await self._fetch("adopt_job", {"id": job.id, "old_worker_id": old_worker_id,
                                               "attempt": job.attempt, "worker_id": worker_id})
        if not rows:
            return None
        row = rows[0]
        counts = [n if isinstance(n, int) and n >= 0 else 0 for n in (row[14], row[15])]
        return AdoptedJob(ClaimedJob(*row[:11]), row[11] == "cancelled", row[12], row[13], counts[0], counts[1])

    async def detached_jobs(self, node_ids: Sequence[str]) -> list[tuple[str, str, str | None, OrphanedJob]]:
        rows = await self._fetch("detached_jobs", {"nodes": list(node_ids)})
        return [(row[0], row[1], row[2], OrphanedJob(*row[3:])) for row in rows]

    async def finished_attempts(self, node_id: str) -> list[tuple[str, int]]:
        rows = await self._fetch("attempts_on_node", {"node_id": node_id})
        return [(row[0], n) for row in rows for n in range(1, row[1] + (0 if row[2] else 1))]

    async def live_daemons_serving(self, node_id: Any, *, lease_ttl_ms: int) -> int:
        rows = await self._fetch("live_daemons_serving", {"node_id": str(node_id), "ttl_ms": lease_ttl_ms})
        return int(rows[0][0])

    # -- nodes --------------------------------------------------------------------------------------------------

    async def upsert_nodes(self, nodes: Sequence[tuple[str, str, str | None]]) -> None:
        params = [{"id": i, "hostname": h, "ip_address": ip} for i, h, ip in nodes]

        async def work(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(Q["upsert_node"], params)

        await self._transaction(work)

    async def node_heartbeats(self, beats: Mapping[str, tuple[str, str]], served: Sequence[str]) -> list[str]:
        params = [{"id": i, "status": s, "capabilities": c} for i, (s, c) in beats.items()]

        async def work(conn: psycopg.AsyncConnection[Any]) -> list[str]:
            if params:
                async with conn.cursor() as cur:
                    await cur.executemany(Q["node_heartbeat"], params)
            cur = await conn.execute(Q["unserved_nodes_offline"], {"nodes": list(served)})
            return [row[0] for row in await cur.fetchall()]

        return await self._transaction(work)

    async def fail_node_jobs(self, node_id: str, error: str, *, queued_before: int | None = None) -> list[str]:
        rows = await self._fetch("fail_node_jobs", {"node_id": node_id, "error": error, "before": queued_before})
        return [row[0] for row in rows]

    async def nodes_overview(self) -> list[dict[str, Any]]:
        return await self._dicts("nodes_overview")

    async def job_counts(self) -> dict[str, int]:
        queued, executing, last_minute, last_hour = (await self._fetch("job_counts"))[0]
        return {"queued": queued, "executing": executing, "finished_last_minute": last_minute,
                "finished_last_hour": last_hour}

    async def queue_by_node(self) -> dict[tuple[str, str], int]:
        return {(str(n), str(s)): c for n, s, c in await self._fetch("queue_by_node")}

    async def heartbeat_ages(self) -> dict[str, int]:
        return {str(n): int(age) for n, age in await self._fetch("heartbeat_ages") if age is not None}

    # -- the CLI's side -----------------------------------------------------------------------------------------

    async def insert_job(self, *, node_id: str, tool: str, command: str, cwd: str | None = None,
                         env: dict[str, str] | None = None, priority: int = 0, timeout_ms: int | None = None,
                         max_attempts: int = 1, delay_ms: int | None = None,
                         depends_on: str | RawText | None = None, conversation_id: str | None = None,
                         message_id: str | None = None) -> str:
        job_id = str(uuid.uuid4())
        await self._fetch("insert_job", {"id": job_id, "node_id": node_id, "tool": tool, "command": command,
                                         "cwd": cwd, "priority": priority,
                                         "timeout_ms": timeout_ms, "max_attempts": max_attempts,
                                         "delay_ms": delay_ms, "depends_on": _text(depends_on),
                                         "env": json.dumps(env) if env else None,
                                         "conversation_id": conversation_id, "message_id": message_id})
        return job_id

    async def prune(self, *, older_than_ms: int, statuses: Sequence[str]) -> int:
        return await self._count("prune_jobs", {"older_than_ms": older_than_ms, "statuses": list(statuses)})

    async def retry(self, job_id: str | RawText) -> bool:
        return bool(await self._fetch("retry_job", {"id": _text(job_id)}))

    async def workers(self) -> list[dict[str, Any]]:
        return await self._dicts("workers")

    async def cancel(self, job_ids: Sequence[str | RawText]) -> list[str | RawText]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> list[str | RawText]:
            done: list[str | RawText] = []
            for job_id in job_ids:
                cur = await conn.execute(Q["cancel_job"], {"id": _text(job_id)})
                done += [row[0] for row in await cur.fetchall()]
            return done

        return await self._transaction(work)

    async def resolve_id(self, prefix: str) -> str | RawText:
        if not prefix:
            raise JobdError("an empty job id names no job")
        if await self.get_job(prefix) is not None:
            return prefix
        rows = await self._fetch("find_job_ids", {"prefix": prefix})
        if not rows:
            raise JobdError(f"no job with an id starting with {prefix!r}")
        if len(rows) > 1:
            raise JobdError(f"{prefix!r} names more than one job; give more characters of the id")
        return str(rows[0][0])

    async def get_job(self, job_id: str | RawText) -> dict[str, Any] | None:
        rows = await self._dicts("get_job", {"id": _text(job_id)})
        return rows[0] if rows else None

    async def list_jobs(self, *, status: str | None, node_id: str | None, limit: int) -> list[dict[str, Any]]:
        return await self._dicts("list_jobs", {"status": status, "node_id": node_id, "limit": limit})

    async def stranded_jobs(self, *, limit: int) -> tuple[int, list[dict[str, Any]]]:
        rows = await self._dicts("stranded_jobs", {"limit": limit})
        return (int(rows[0].pop("total")) if rows else 0), [{k: v for k, v in r.items() if k != "total"} for r in rows]

    async def prune_workers(self, *, older_than_ms: int = WORKERS_KEPT_MS, keep: int = WORKERS_KEPT) -> int:
        return await self._count("prune_workers", {"older_than_ms": older_than_ms, "keep": keep})

    # -- the web console's side (daemon.web) ------------------------------------------------------------------

    def row_watcher(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """LISTEN on the channel every job and node write notifies (migration 0004), as well as the daemons'."""
        return _Listener(self.url, self.name, on_change, poll_s, channels=(CHANNEL, ROWS_CHANNEL))

    async def find_jobs(self, *, status: str | None, node_id: str | None, text: str | None,
                        before: tuple[int, str] | None, limit: int) -> list[dict[str, Any]]:
        return await self._dicts("find_jobs", {"status": status, "node_id": node_id, "text": text, "limit": limit,
                                               **page_params(before)})

    async def _job_state(self, job_id: str | RawText) -> tuple[Any, ...] | None:
        rows = await self._fetch("job_state", {"id": _text(job_id)})
        return tuple(rows[0]) if rows else None

    async def _job_output(self, job_id: str | RawText, params: dict[str, Any]) -> dict[str, Any] | None:
        rows = await self._dicts("job_output_since", {"id": _text(job_id), **params})
        return rows[0] if rows else None

    async def job_timings(self, *, since_ms: int, limit: int) -> list[tuple[Any, ...]]:
        return await self._fetch("job_timings", {"since": since_ms, "limit": limit})


def _text(value: str | RawText | None) -> str | None:
    """PostgreSQL's TEXT is always valid UTF-8: a RawText (only SQLite has them) is looked up as its escaped text."""
    return str(value) if isinstance(value, RawText) else value


class _Listener(ChangeSource):
    """LISTEN on a connection of its own; each notification calls `on_change`. A lost connection is made again
    with back-off (logged), and a reconnect is itself a change: what was notified meanwhile was missed. A safety
    poll every `poll_s` calls it too: a notification lost with a connection is found by it at the latest."""

    def __init__(self, url: str, name: str, on_change: Callable[[], None], poll_s: float, *,
                 channels: tuple[str, ...] = (CHANNEL,)) -> None:
        self._url, self._name, self._on_change, self._poll_s = url, name, on_change, poll_s
        self._channels = channels
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def uses_push(self) -> bool:
        return True

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._listen(), name="pg listen"),
                           loop.create_task(self._poll(), name="pg safety poll")]

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            self._on_change()

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            try:
                conn = await PostgresStore._new_connection(self._url)
                async with conn:
                    for channel in self._channels:
                        await conn.execute(f"LISTEN {channel}")
                    delay = 0.1
                    self._on_change()  # anything queued while we were not listening
                    async for _ in conn.notifies():
                        self._on_change()
            except Exception as e:  # whatever broke the connection: the safety poll covers us until it is back
                logger.warning("db.listen_lost", db=self._name, error=said(self._url, e) or type(e).__name__,
                               retry_in_s=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
