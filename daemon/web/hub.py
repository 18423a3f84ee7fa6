"""The web process's one look at the database per change: the store's change source (inotify on a SQLite file,
LISTEN on PostgreSQL) wakes it, and every followed job and every list the console shows is read once, whatever
the number of clients; they are sent what changed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from daemon import logging as log
from daemon.config import Config
from daemon.errors import JobdError
from daemon.store import DbError, RawText, Store, now_ms
from daemon.web import charts, views
from daemon.web.feeds import Broadcast, JobFeed

logger = log.get("web")
TICK_S = 5.0  # a look without a change: heartbeat ages move on, and a lost notification is made up for
# A file's change comes from the write of its WAL, just before the commit is published: look again 1, 2, 4 ...
# 256 ms later (about 2 s in all, for a slow fsync), each time only if someone committed (a cheap probe).
# Looks at most this often: on a busy database every commit wakes the hub, and a look at a followed job reads its
# row (on SQLite even its counters sit behind the output in the record); changes in between are seen together.
MIN_GAP_S = 0.01
# The console's lists at most this often: a page of 50 rows reads their counters, which sit behind their output in
# a SQLite record (megabytes a row); within the 1 s a new row must take to show.
LIST_GAP_S = 0.25
STATS_TTL_S = 5.0
STATS_ROWS = 200_000  # the most recent jobs the charts read
REFRESH_ERRORS: tuple[type[Exception], ...] = (*DbError, JobdError)


class Shared(Protocol):
    clients: int


K = TypeVar("K")
S = TypeVar("S", bound=Shared)


@contextlib.asynccontextmanager
async def _shared(registry: dict[K, S], key: K, make: Callable[[], S],
                  load: Callable[[S], Awaitable[None]]) -> AsyncIterator[S]:
    """The registry's value for `key` (made if missing, loaded), counted as used while the block runs, and dropped
    from the registry when its last user leaves."""
    value = registry.get(key)
    if value is None:
        value = registry[key] = make()
    value.clients += 1
    try:
        await load(value)
        yield value
    finally:
        value.clients -= 1
        if value.clients == 0 and registry.get(key) is value:
            del registry[key]


@dataclass(frozen=True)
class ListQuery:
    status: str | None
    node_id: str | None
    text: str | None
    limit: int


class Snapshot:
    """The latest JSON of something the console watches; `changed` (the console's, shared) fires when it differs."""

    def __init__(self, changed: Broadcast) -> None:
        self.data: bytes | None = None
        self.changed = changed
        self.clients = 0

    def update(self, data: bytes) -> None:
        if data != self.data:
            self.data = data
            self.changed.notify()


class Hub:
    def __init__(self, store: Store, cfg: Config) -> None:
        self.store = store
        self.cfg = cfg
        self.feeds: dict[str | RawText, JobFeed] = {}
        self.lists: dict[ListQuery, Snapshot] = {}
        self.console_changed = Broadcast()
        self.nodes = Snapshot(self.console_changed)
        self._wake = asyncio.Event()
        self._notified = False
        self._stats: dict[int, tuple[float, dict[str, Any]]] = {}
        self._lock = asyncio.Lock()  # one look at a time
        self.stopping = False
        self._lists_at = 0.0  # monotonic time the lists were last read
        self._lists_due = False  # a change came since, and they wait for LIST_GAP_S

    # -- the loop -------------------------------------------------------------------------------------------

    def _on_change(self) -> None:
        self._notified = True
        self._wake.set()

    async def run(self) -> None:
        """Look at once when the store says a row changed (it rechecks as a commit lands), every TICK_S without one
        (heartbeat ages move on, a lost notification is made up for), and when the lists' wait is over."""
        source = self.store.row_watcher(self._on_change, poll_s=TICK_S)
        source.start()
        last = 0.0
        try:
            while True:
                timeout = TICK_S
                if self._lists_due:
                    timeout = min(timeout, max(0.0, self._lists_at + LIST_GAP_S - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                self._wake.clear()
                self._notified = False
                await asyncio.sleep(max(0.0, last + MIN_GAP_S - time.monotonic()))
                last = time.monotonic()
                await self.refresh()
        finally:
            source.close()

    def _lists_ready(self) -> bool:
        return self._lists_due and time.monotonic() >= self._lists_at + LIST_GAP_S

    def stop(self) -> None:
        """End every open stream now (the server is stopping; it would otherwise wait for them, then cancel them)."""
        self.stopping = True
        for feed in self.feeds.values():
            feed.closed = True
            feed.changed.notify()
        self.console_changed.notify()

    async def refresh(self) -> None:
        """Look at every followed job and every watched list once."""
        async with self._lock:
            try:
                for feed in list(self.feeds.values()):
                    await feed.refresh(self.store)
                if time.monotonic() < self._lists_at + LIST_GAP_S:
                    self._lists_due = True  # the run loop comes back for them
                    return
                self._lists_at, self._lists_due = time.monotonic(), False
                for query, snapshot in list(self.lists.items()):
                    snapshot.update(await self.jobs_json(query))
                if self.nodes.clients:
                    self.nodes.update(await self.nodes_json())
            except REFRESH_ERRORS as e:  # the next change or tick tries again
                logger.warning("web.refresh_failed", error=str(e))

    # -- what clients follow ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def follow(self, job_id: str | RawText) -> AsyncIterator[JobFeed]:
        """The job's feed, shared by its clients (read once, under the look's lock, when the first one comes)."""

        async def load(feed: JobFeed) -> None:
            if not feed.loaded.is_set():
                async with self._lock:
                    if not feed.loaded.is_set():
                        await feed.refresh(self.store)

        async with _shared(self.feeds, job_id, lambda: JobFeed(job_id), load) as feed:
            yield feed

    @contextlib.asynccontextmanager
    async def watch_list(self, query: ListQuery) -> AsyncIterator[Snapshot]:
        async def load(snapshot: Snapshot) -> None:
            if snapshot.data is None:
                snapshot.update(await self.jobs_json(query))

        async with _shared(self.lists, query, lambda: Snapshot(self.console_changed), load) as snapshot:
            yield snapshot

    @contextlib.asynccontextmanager
    async def watch_nodes(self) -> AsyncIterator[Snapshot]:
        self.nodes.clients += 1
        try:
            if self.nodes.data is None or self.nodes.clients == 1:
                self.nodes.update(await self.nodes_json())
            yield self.nodes
        finally:
            self.nodes.clients -= 1

    # -- reads shared by the API and the snapshots ---------------------------------------------------------------

    async def jobs(self, query: ListQuery, before: tuple[int, str] | None = None) -> dict[str, Any]:
        rows = await self.store.find_jobs(status=query.status, node_id=query.node_id, text=query.text,
                                          before=before, limit=query.limit)
        return {"jobs": rows, "next": views.page_cursor(rows, query.limit), "counts": await self.store.job_counts()}

    async def jobs_json(self, query: ListQuery) -> bytes:
        return views.dumps({"type": "jobs", **await self.jobs(query)})

    async def node_list(self) -> dict[str, Any]:
        beat = self.cfg.heartbeat_interval_ms
        return {"nodes": [views.node(row, beat) for row in await self.store.nodes_overview()],
                "daemons": [views.daemon(row, self.cfg.lease_ttl_ms) for row in await self.store.workers()]}

    async def nodes_json(self) -> bytes:
        return views.dumps({"type": "nodes", **await self.node_list()})

    async def stats(self, hours: int) -> dict[str, Any]:
        """The charts, computed at most once per STATS_TTL_S for all clients."""
        cached = self._stats.get(hours)
        if cached is not None and time.monotonic() - cached[0] < STATS_TTL_S:
            return cached[1]
        now = now_ms()
        rows = await self.store.job_timings(since_ms=now - hours * 3_600_000, limit=STATS_ROWS)
        result = charts.stats(rows, now_ms=now, hours=hours)
        self._stats[hours] = (time.monotonic(), result)
        return result
