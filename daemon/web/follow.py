"""A job's row as NexusCLI's stream of events: what each look at the row adds, by byte offsets that survive the
output cap (daemon.output keeps a head and a sliding tail) and a reconnect (an event's id is the cursor after it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from daemon.store import JobStatus

# The cap's marker, as daemon.output writes it between the head and the tail.
MARKER = re.compile(rb"\n\[nexus-jobd: (\d+) bytes of (?:stdout|stderr) omitted; (\d+) bytes in all\]\n")
MARKER_ROOM = 64  # the marker starts at most this many bytes before the part the store finds (its total)
CHUNK_BYTES = 256 * 1024  # output events hold at most this much: a reconnect resumes at most this far back
STREAMS = ("stdout", "stderr")
_PHASES = ("", "queued", "executing", "cancelled", "done")
_ICONS = {"queued": "⏱️", "executing": "▶", "cancelled": "⛔"}


@dataclass(frozen=True)
class Cursor:
    """Where a client is: the attempt it follows, the bytes of each stream it has (the job's own byte count once
    the cap cuts the column), and the last status it was sent. Its text is the SSE event id."""

    attempt: int = 0
    stdout: int = 0
    stderr: int = 0
    phase: str = ""

    def text(self) -> str:
        return f"{self.attempt}.{self.stdout}.{self.stderr}.{self.phase}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """An id this server sent; ValueError for anything else."""
        parts = text.split(".")
        if len(parts) != 4 or parts[3] not in _PHASES or not all(p.isascii() and p.isdigit() for p in parts[:3]):
            raise ValueError(f"Last-Event-ID {text[:80]!r} is not an event id of this stream "
                             "(ATTEMPT.STDOUT.STDERR.PHASE); reconnect without it to start from the beginning")
        return cls(int(parts[0]), int(parts[1]), int(parts[2]), parts[3])

    def at(self, stream: str) -> int:
        return self.stdout if stream == "stdout" else self.stderr

    def moved(self, stream: str, pos: int) -> Cursor:
        return replace(self, stdout=pos) if stream == "stdout" else replace(self, stderr=pos)


@dataclass(frozen=True)
class Column:
    """What the store read of one stream's column (Store.job_output_since)."""

    start: int  # the byte offset `chunk` starts at
    chunk: bytes
    length: int  # the column's length in bytes
    marker: int  # 1-based position of the cap marker's total part; 0: the column holds the stream whole
    total: int  # the bytes the job wrote (stdout_bytes)

    @classmethod
    def of(cls, row: dict[str, Any], stream: str, start: int) -> Column:
        def number(key: str) -> int:
            value = row.get(f"{stream}_{key}")
            return value if isinstance(value, int) else 0

        chunk = row.get(f"{stream}_chunk")
        return cls(start, bytes(chunk) if chunk else b"", number("length"), number("marker"), number("bytes"))


@dataclass(frozen=True)
class Piece:
    """Text to send, and the stream's position once it is sent."""

    text: str
    pos: int


def read_offset(pos: int, head: int | None) -> int:
    """Where to read a column from for a client at `pos`: there, or once the cap cut it, no later than its head's
    end (the marker says how much the tail after it stands for)."""
    return pos if head is None else min(pos, head)


def complete(data: bytes) -> int:
    """Length of `data` without a trailing UTF-8 character cut short."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte < 0x80:
            return n
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n if back >= need else n - back
    return n


def _lead(data: bytes) -> int:
    """Continuation bytes at the start of `data` (a cut that fell inside a character)."""
    skip = 0
    while skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    return skip


def _bytes_piece(data: bytes, start: int, pos: int, end: int) -> list[Piece]:
    """data[pos - start : end - start] (logical positions), cut at whole characters, in pieces of CHUNK_BYTES."""
    part = data[pos - start: end - start]
    skip = _lead(part)
    pieces, pos, part = ([Piece("", pos + skip)] if skip else []), pos + skip, part[skip:]
    part = part[:complete(part)]
    while part:
        cut = len(part) if len(part) <= CHUNK_BYTES else complete(part[:CHUNK_BYTES]) or CHUNK_BYTES
        pos += cut
        pieces.append(Piece(part[:cut].decode("utf-8", "replace"), pos))
        part = part[cut:]
    return pieces


@dataclass(frozen=True)
class Step:
    """What one read of a column adds: pieces to send, the head's length once capped, or where to read again."""

    pieces: list[Piece]
    head: int | None
    again_from: int | None = None


def step(stream: str, pos: int, head: int | None, col: Column, until: int | None = None) -> Step:
    """The pieces that take a client from `pos` towards the column's end (or `until`), given what was read."""
    if not col.marker:
        if head is not None:  # it was cut and no longer is: the column is being written anew from the job's spool
            return Step([], head)
        end = col.start + len(col.chunk) if until is None else min(col.start + len(col.chunk), until)
        if pos < col.start or end <= pos:
            return Step([], None)
        return Step(_bytes_piece(col.chunk, col.start, pos, end), None)
    found = MARKER.search(col.chunk, max(0, col.marker - 1 - col.start - MARKER_ROOM))
    if found is None or col.start > pos and col.start + found.start() > pos:
        return Step([], head, again_from=max(0, min(pos, col.marker - 1 - MARKER_ROOM)))
    head_end = col.start + found.start()
    limit = col.total if until is None else min(col.total, until)
    pieces = _bytes_piece(col.chunk, col.start, pos, min(head_end, limit)) if pos < head_end else []
    pos = max(pos, pieces[-1].pos if pieces else pos)
    if pos < head_end:  # `until` fell inside the head
        return Step(pieces, head_end)
    tail_start = col.total - (col.length - (head_end + len(found.group())))
    if pos < tail_start and pos < limit:
        gap_end = min(tail_start, limit)
        pieces.append(Piece(f"\n[nexus-jobd: {gap_end - pos} bytes of {stream} not shown]\n", gap_end))
        pos = gap_end
    tail_in_chunk = col.start + found.end()  # column offset of the tail's first byte
    chunk_end = tail_start + (col.start + len(col.chunk) - tail_in_chunk)  # logical end of what was read
    if pos < min(limit, chunk_end):
        pieces += _bytes_piece(col.chunk, tail_start - found.end(), pos, min(limit, chunk_end))
    return Step(pieces, head_end)


# -- events --------------------------------------------------------------------------------------------------


def ended(row: dict[str, Any]) -> bool:
    """Final, and nothing more will be written: the daemon recorded it, or no daemon holds it (cancelled while
    queued, or while waiting for a retry)."""
    if row.get("status") not in {s.value for s in JobStatus if s.is_final}:
        return False
    return row.get("duration") is not None or row.get("worker_id") is None


def phase_of(row: dict[str, Any]) -> str:
    """The status event a row calls for: NexusCLI's categories (completed and failed end with response_done)."""
    if ended(row):
        return "done"
    status = row.get("status")
    return status if status in ("queued", "executing", "cancelled") else ""


def status_event(row: dict[str, Any], phase: str) -> dict[str, Any]:
    node = row.get("node_id")
    attempt = row.get("attempt") if isinstance(row.get("attempt"), int) else 0
    if phase == "cancelled":
        message = "Job cancelled"
    elif phase == "executing":
        message = f"Executing on {node}..." + (f" (attempt {attempt})" if attempt > 1 else "")
    else:
        message = f"Queued on {node}..." + (f" (attempt {attempt + 1} after a failure)" if attempt else "")
    return {"type": "status", "category": phase, "nodeId": node, "message": message, "icon": _ICONS[phase],
            "attempt": attempt, "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds")}


def end_events(row: dict[str, Any]) -> list[dict[str, Any]]:
    """response_done for a completed or failed job, its error if it failed with one, then done."""
    events: list[dict[str, Any]] = []
    if row.get("status") in ("completed", "failed"):
        events.append({"type": "response_done", "exitCode": row.get("exit_code"), "duration": row.get("duration")})
    if row.get("status") == "failed" and row.get("error"):
        events.append({"type": "error", "error": str(row["error"])})
    return [*events, {"type": "done"}]


def frame(cursor: Cursor, event: dict[str, Any]) -> bytes:
    """One Server-Sent Event: its id (the cursor after it) and its JSON."""
    return b"id: %s\ndata: %s\n\n" % (cursor.text().encode(), json.dumps(event, ensure_ascii=False,
                                                                        default=str).encode())
