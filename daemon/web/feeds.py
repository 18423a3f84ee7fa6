"""Followed jobs: one reader per job, whatever the number of clients, and the events it made, kept for a while.

A client that joins late, falls behind the kept events, or reconnects with a Last-Event-ID older than them catches
up from the row itself, up to where the shared feed is, then takes the feed's events.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from daemon import logging as log
from daemon.store import RawText, Store
from daemon.web.follow import (
    STREAMS,
    Column,
    Cursor,
    end_events,
    frame,
    phase_of,
    read_offset,
    recent_after,
    status_event,
    step,
)

logger = log.get("web")
READ_BYTES = 8 * 1024 * 1024  # at most this much of a column per read; the rest in the next read
MAX_READS = 64  # reads in one look: a column of READ_BYTES * MAX_READS is followed over several looks
LOG_BYTES = 32 * 1024 * 1024  # events a feed keeps for clients that are behind (or reconnect); shared by all
ENTRY_BYTES = 1024 * 1024  # events sent to a client in one write
KEEPALIVE_S = 15.0  # a comment this often keeps proxies and NAT from dropping an idle stream


class Broadcast:
    """Wakes everyone waiting at once; each waits for the next `notify` after it started waiting."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        except TimeoutError:
            return False
        return True


@dataclass
class Memo:
    """Per stream what the next read needs besides the cursor: the bytes before the cap's marker once the cap cut
    the column, and the last bytes sent (they place a cut column's tail to the byte)."""

    head: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(STREAMS))
    recent: dict[str, bytes] = field(default_factory=lambda: dict.fromkeys(STREAMS, b""))

    def copy(self) -> Memo:
        return Memo(dict(self.head), dict(self.recent))


@dataclass
class Look:
    events: list[tuple[Cursor, dict[str, Any]]] = field(default_factory=list)
    cursor: Cursor = field(default_factory=Cursor)
    memo: Memo = field(default_factory=Memo)
    row: dict[str, Any] | None = None


async def look(store: Store, job_id: str | RawText, cursor: Cursor, memo: Memo, until: Cursor | None = None,
               known: tuple[Any, ...] | None = None) -> AsyncIterator[Look]:
    """The events that take `cursor` to the row as it is now (or to `until`, a cursor the row has passed), one Look
    per read of the row, so that what a big column gives goes out as it is read. `known`: the row's state at the
    last look; a row that still has it is not read again (Look.row is then only its state)."""
    out = Look(cursor=cursor, memo=memo.copy())
    again: dict[str, int] = {}  # streams to read again, and from where
    for _ in range(MAX_READS):
        offsets = {s: again.get(s, read_offset(out.cursor.at(s), out.memo.head[s])) for s in STREAMS}
        hints = (_hint(out.memo.head["stdout"]), _hint(out.memo.head["stderr"]))
        row = await store.job_output_since(job_id, stdout_from=offsets["stdout"], stderr_from=offsets["stderr"],
                                           max_bytes=READ_BYTES, known=known if not again else None, hints=hints)
        out.row = row
        if row is None or "id" not in row:  # deleted, or no change since `known`
            yield out
            return
        attempt = row["attempt"] if isinstance(row.get("attempt"), int) else 0
        if attempt != out.cursor.attempt:
            if until is not None:  # a new attempt since the feed's look: its output of `until` is gone
                out.cursor = until
                yield out
                return
            out.cursor, out.memo, again = Cursor(attempt=attempt), Memo(), {}
            continue
        _status(out, row, phase_of(row) if until is None else until.phase)
        again = _read_streams(out, row, offsets, until)
        if not again:
            break
        yield out
        out = Look(cursor=out.cursor, memo=out.memo, row=row)
    _end(out, until)
    yield out


def _end(out: Look, until: Cursor | None) -> None:
    """After the last read of a look: the end of the job, if it ended (and so far as `until` says)."""
    row = out.row
    assert row is not None
    if (phase_of(row) if until is None else until.phase) == "done" and out.cursor.phase != "done":
        if row.get("status") == "cancelled":  # cancelled and recorded between two looks: still said, as NexusCLI does
            _status(out, row, "cancelled")
        out.cursor = replace(out.cursor, phase="done")
        out.events += [(out.cursor, event) for event in end_events(row)]


def _hint(head: int | None) -> int:
    return -1 if head is None else head


def _status(out: Look, row: dict[str, Any], phase: str) -> None:
    if phase in ("queued", "executing", "cancelled") and phase != out.cursor.phase:
        out.cursor = replace(out.cursor, phase=phase)
        out.events.append((out.cursor, status_event(row, phase)))


def _read_streams(out: Look, row: dict[str, Any], offsets: dict[str, int], until: Cursor | None) -> dict[str, int]:
    """Add what each stream's read gives; the streams that need another read (a full chunk, or one that did not
    reach where the client is), and from where."""
    again = {}
    for stream in STREAMS:
        col = Column.of(row, stream)
        result = step(stream, out.cursor.at(stream), out.memo.head[stream], col,
                      None if until is None else until.at(stream), out.memo.recent[stream])
        out.memo.head[stream] = result.head
        out.memo.recent[stream] = recent_after(out.memo.recent[stream], result.pieces)
        for piece in result.pieces:
            out.cursor = out.cursor.moved(stream, piece.pos)
            if piece.text:
                out.events.append((out.cursor, {"type": "output_chunk", "stream": stream, "text": piece.text,
                                                "isIncremental": True}))
        if result.again_from is not None:
            again[stream] = result.again_from
        elif len(col.chunk) >= READ_BYTES and result.pieces:
            again[stream] = read_offset(out.cursor.at(stream), result.head)
    return again


@dataclass(frozen=True)
class Entry:
    seq: int
    before: Cursor
    after: Cursor
    data: bytes  # one or more SSE frames


class JobFeed:
    """The one reader of a followed job, and the events it made (the latest LOG_BYTES of them)."""

    def __init__(self, job_id: str | RawText) -> None:
        self.job_id = job_id
        self.cursor = Cursor()
        self.memo = Memo()
        self.state: tuple[Any, ...] | None = None  # the row's Store.job_state at the last look
        self.seq = 0
        self.log: collections.deque[Entry] = collections.deque()
        self._log_bytes = 0
        self.changed = Broadcast()
        self.loaded = asyncio.Event()  # set after the first look
        self.gone = False  # the row was deleted
        self.closed = False  # the web process is stopping: its clients' streams end
        self.clients = 0

    @property
    def done(self) -> bool:
        return self.gone or self.cursor.phase == "done"

    async def refresh(self, store: Store) -> None:
        if self.done:
            return
        started = time.monotonic()
        async for part in look(store, self.job_id, self.cursor, self.memo, known=self.state):
            if part.row is not None and "id" not in part.row:  # unchanged
                return
            self.memo = part.memo
            events = part.events
            if part.row is None:
                self.gone = True
                events = [(self.cursor, {"type": "error", "error": "the job was deleted"}),
                          (self.cursor, {"type": "done"})]
            else:
                self.state = part.row.get("state")
            if events:
                self._append(part.cursor, events)
            self.cursor = part.cursor
            self.loaded.set()
            if events or self.gone:
                self.changed.notify()
        logger.debug("web.look", job_id=str(self.job_id), took_ms=round((time.monotonic() - started) * 1000),
                     sent=self.cursor.text())

    def _append(self, after: Cursor, events: list[tuple[Cursor, dict[str, Any]]]) -> None:
        """The events as entries of at most ENTRY_BYTES (or one event): each is one write to each client, and what
        a client's socket holds beyond its buffer is one entry at most, however far behind it is."""
        before, size = self.cursor, 0
        frames: list[tuple[Cursor, bytes]] = []
        for cursor, event in events:
            data = frame(cursor, event)
            if frames and size + len(data) > ENTRY_BYTES:
                self._keep(before, before := frames[-1][0], b"".join(f for _, f in frames))
                frames, size = [], 0
            frames.append((cursor, data))
            size += len(data)
        if frames:
            self._keep(before, after, b"".join(f for _, f in frames))

    def _keep(self, before: Cursor, after: Cursor, data: bytes) -> None:
        self.seq += 1
        self.log.append(Entry(self.seq, before, after, data))
        self._log_bytes += len(data)
        while len(self.log) > 1 and self._log_bytes > LOG_BYTES:
            self._log_bytes -= len(self.log.popleft().data)

    def entries_after(self, seq: int) -> list[Entry] | None:
        """The entries after `seq`; None when some of them are no longer kept."""
        if self.log and self.log[0].seq > seq + 1:
            return None
        return [entry for entry in self.log if entry.seq > seq]

    def seq_before(self, cursor: Cursor) -> int | None:
        """The seq to follow from for a client at `cursor`, if the kept events start exactly there."""
        for entry in reversed(self.log):
            if entry.before == cursor:
                return entry.seq - 1
        return None if cursor != self.cursor else self.seq


async def events_for(store: Store, feed: JobFeed, start: Cursor) -> AsyncIterator[bytes]:
    """What one client is sent: from `start` to the job's end, caught up from the row where the feed's kept events
    do not reach back, then the feed's events as they come; comments keep an idle stream alive."""
    await feed.loaded.wait()
    cursor, seq = start, feed.seq_before(start)
    while True:
        if seq is None:  # behind what the feed keeps: catch up from the row, up to where the feed is now
            target, seq = feed.cursor, feed.seq
            logger.debug("web.catch_up", job_id=str(feed.job_id), since=cursor.text(), until=target.text())
            # The feed's memo: its head is this attempt's too; its recent bytes are where the feed is, not the
            # client, so they do not place the tail for the client (Memo's recent: none assumed).
            memo = Memo(dict(feed.memo.head)) if cursor.attempt == target.attempt else Memo()
            async for part in look(store, feed.job_id, cursor, memo, until=target):
                if part.events:
                    yield b"".join(frame(c, event) for c, event in part.events)
            cursor = target
        entries = feed.entries_after(seq)
        if entries is None:
            seq = None
            continue
        for entry in entries:
            yield entry.data
            cursor, seq = entry.after, entry.seq
        if (feed.done and seq == feed.seq) or feed.closed:
            return
        if not entries and not await feed.changed.wait(KEEPALIVE_S):
            yield b": keep-alive\n\n"
