"""The PostgreSQL driver: daemons on several hosts share one queue. Claims with FOR UPDATE SKIP LOCKED, wake-ups by
LISTEN/NOTIFY, every time from the database's clock. The only module that imports psycopg (the `postgres` extra),
and only when a postgresql:// URL is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from daemon import logging as log
from daemon.config import redact_secrets, redact_url
from daemon.errors import DatabaseError
from daemon.model import Claim, RawText
from daemon.store.base import ChangeSource, DbRejected, DbUnavailable
from daemon.store.contract import CONTRACT, TABLES, check_problems, contract_problems, migrations
from daemon.store.driver import Driver, Params, Rows, Tx
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
MIGRATIONS = HERE / "migrations"
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


def _no_nul(text: str) -> str:
    """PostgreSQL's TEXT cannot hold NUL; a job that prints one keeps the rest of its output (U+FFFD in its place)."""
    return text.replace("\0", "\ufffd") if "\0" in text else text


async def new_connection(url: str) -> psycopg.AsyncConnection[Any]:
    given = psycopg.conninfo.conninfo_to_dict(url)
    extra = {k: v for k, v in _DEFAULTS.items() if k not in given}
    conninfo = psycopg.conninfo.make_conninfo(url, **extra)
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


async def _rows(conn: psycopg.AsyncConnection[Any], query: str, params: Params | None) -> Rows:
    cur = await conn.execute(Q[query], params or {})
    if cur.description is None:  # a statement that returns no rows
        return Rows((), ())
    return Rows(await cur.fetchall(), tuple(column.name for column in cur.description))


class _Statements(Tx):
    """Named statements on the connection of one transaction."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._conn = conn

    async def rows(self, query: str, params: Params | None = None) -> Rows:
        return await _rows(self._conn, query, params)

    async def execute(self, query: str, params: Params | None = None) -> None:
        await self._conn.execute(Q[query], params or {})

    async def executemany(self, query: str, params: Sequence[Params]) -> None:
        if params:
            async with self._conn.cursor() as cur:
                await cur.executemany(Q[query], params)


class PostgresDriver(Driver):
    """One connection for the store's statements (each transaction under a lock, since coroutines share it), made
    again when lost; a second one LISTENs (see _Listener)."""

    shared_by_hosts = True
    text = staticmethod(_no_nul)

    def __init__(self, url: str, conn: psycopg.AsyncConnection[Any]) -> None:
        self.url = url
        self.name = redact_url(url)
        self._conn: psycopg.AsyncConnection[Any] | None = conn
        self._lock = asyncio.Lock()
        self._closed = False
        self._reconnect_delay_s = 0.0

    @classmethod
    async def connect(cls, url: str, *, create: bool = True) -> PostgresDriver:
        """Connect at start-up: a wrong URL, a refused password, a missing database stop here, in one line.
        `create`: make the tables if missing (else a database without them is refused, as for a SQLite file)."""
        try:
            conn = await new_connection(url)
        except psycopg.Error as e:
            raise DatabaseError(explain(url, e)) from None
        driver = cls(url, conn)
        have = await driver._columns()
        if not create and (missing := [table for table in CONTRACT if table not in have]):
            await driver.close()
            raise DatabaseError(f"{driver.name}: tables {', '.join(missing)} are missing: it is not a nexus-jobd "
                                "database yet; run `nexus-jobd db migrate` (or start the daemon), or check --db")
        kinds = dict((await driver.read("table_kinds", {"tables": list(TABLES)})).tuples("table_name", "table_type"))
        if problems := contract_problems(kinds, "BASE TABLE", have):
            await driver.close()
            raise DatabaseError(f"{driver.name}: not a usable database: {'; '.join(problems)}. It is not the jobs "
                                "database of NexusCLI or nexus-jobd (nothing was changed): check --db")
        return driver

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
            self._conn = await new_connection(self.url)
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

    # -- the primitives: in autocommit, a statement is its own transaction ------------------------------------

    async def read(self, query: str, params: Params | None = None) -> Rows:
        async with self._session() as conn:
            return await _rows(conn, query, params)

    async def write(self, query: str, params: Params | None = None) -> Rows:
        return await self.read(query, params)

    async def write_count(self, query: str, params: Params) -> int:
        async with self._session() as conn:
            cur = await conn.execute(Q[query], params)
            return int(cur.rowcount)

    async def transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        async with self._session(transaction=True) as conn:
            return await work(_Statements(conn))

    # -- binding ----------------------------------------------------------------------------------------------

    def array(self, items: Iterable[Any]) -> list[Any]:
        return list(items)

    def claims(self, claims: Sequence[Claim]) -> dict[str, Any]:
        return {"ids": [claim.job_id for claim in claims], "attempts": [claim.attempt for claim in claims]}

    def key(self, value: str | RawText | None) -> str | None:
        """PostgreSQL's TEXT is always valid UTF-8: a RawText (only SQLite has them) is looked up as its escaped
        text."""
        return str(value) if isinstance(value, RawText) else value


    # -- schema, backups, wake-ups ----------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        applied: list[str] = []
        async with self._session(transaction=True) as conn:
            await conn.execute(Q["migration_lock"])
            await conn.execute(read_sql("schema.sql").encode())  # bytes: a script of several statements, no params
            done = set((await _rows(conn, "applied_migrations", None)).column("name"))
            for name, text in migrations(MIGRATIONS):
                if name not in done:
                    await conn.execute(text.encode())
                    await conn.execute(Q["record_migration"], {"name": name})
                    applied.append(name)
        for name in applied:
            logger.info("db.migrated", migration=name, db=self.name)
        return applied

    async def _columns(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        rows = await self.read("table_columns", {"tables": list(TABLES)})
        for table, column in rows.tuples("table_name", "column_name"):
            found.setdefault(table, set()).add(column)
        return found

    async def check(self) -> list[str]:
        have = await self._columns()
        applied = set((await self.read("applied_migrations")).column("name")) if "jobd_migrations" in have else None
        return check_problems(have, applied, MIGRATIONS)

    async def backup(self, target: Path) -> None:
        raise DatabaseError(f"{self.name} is a PostgreSQL database: back it up with pg_dump")

    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        return _Listener(self.url, self.name, on_change, poll_s)

    def row_changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """LISTEN on the channel every job and node write notifies (migration 0004), as well as the daemons'."""
        return _Listener(self.url, self.name, on_change, poll_s, channels=(CHANNEL, ROWS_CHANNEL))


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
                conn = await new_connection(self._url)
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
