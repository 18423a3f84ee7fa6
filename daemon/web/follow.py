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

    start: int  # the column offset `chunk` starts at
    chunk: bytes
    length: int  # the column's length in bytes
    total: int  # the bytes the job wrote (stdout_bytes)
    around_at: int = -1  # where `around` starts; -1: the column holds the stream whole (no cap's marker)
    around: bytes = b""  # the bytes that hold the cap's marker

    @classmethod
    def of(cls, row: dict[str, Any], stream: str) -> Column:
        def number(key: str, default: int = 0) -> int:
            value = row.get(f"{stream}_{key}")
            return value if isinstance(value, int) else default

        chunk, around = row.get(f"{stream}_chunk"), row.get(f"{stream}_around")
        return cls(number("start"), bytes(chunk) if chunk else b"", number("length"), number("bytes"),
                   number("around_at", -1), bytes(around) if around else b"")


@dataclass(frozen=True)
class Piece:
    """Text to send, and the stream's position once it is sent; `note`: words of ours, not the job's bytes."""

    text: str
    pos: int
    note: bool = False


RECENT_BYTES = 16  # the last bytes sent of a stream: where they are in a cut column's tail places it exactly


def recent_after(recent: bytes, pieces: list[Piece]) -> bytes:
    for piece in pieces:
        if not piece.note:
            recent = (recent + piece.text.encode("utf-8", "surrogatepass"))[-RECENT_BYTES:]
    return recent


def read_offset(pos: int, head: int | None) -> int:
    """Where to read a column from for a client at `pos` (Store.job_output_since's `*_from`): there; or once the cap
    cut it and `pos` is past the head, from the stream's byte `pos` counted back from the end (a little before it:
    the bytes sent last, found there, place the tail exactly)."""
    if head is None or pos < head:
        return pos
    return -max(0, pos - RECENT_BYTES - 3)


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


def _tail_start(col: Column, tail_at: int, pos: int, recent: bytes) -> int:
    """Where the cut column's tail starts in the stream. It ends where the job's bytes do (the marker's TOTAL) less
    a character the daemon holds back until it is whole (0 to 3 bytes): the bytes last sent, found just before
    `pos`, say how many; without them (or where they match no shift) none is assumed."""
    tail_len = col.length - tail_at
    for held in range(4):
        start = col.total - held - tail_len
        end = tail_at + (pos - start) - col.start  # index in the chunk of `pos`, with this shift
        if recent and end - len(recent) >= 0 and end <= len(col.chunk) and col.chunk[end - len(recent):end] == recent:
            return start
    return col.total - tail_len


def step(stream: str, pos: int, head: int | None, col: Column, until: int | None = None,
         recent: bytes = b"") -> Step:
    """The pieces that take a client from `pos` towards the column's end (or `until`), given what was read;
    `recent`: the bytes sent last (recent_after), which place a cut column's tail to the byte."""
    if col.around_at < 0:
        if head is not None:  # it was cut and no longer is: the column is being written anew from the job's spool
            return Step([], head)
        end = col.start + len(col.chunk) if until is None else min(col.start + len(col.chunk), until)
        if pos < col.start or end <= pos:
            return Step([], None)
        return Step(_bytes_piece(col.chunk, col.start, pos, end), None)
    return _capped(stream, pos, head, col, col.total if until is None else min(col.total, until), recent)


def _capped(stream: str, pos: int, head: int | None, col: Column, limit: int, recent: bytes) -> Step:
    """step() for a column the cap cut: its head, a note for what the client missed of the middle, the tail."""
    found = MARKER.search(col.around)
    if found is None:  # not where it was (the column is being written anew): look for it again
        return Step([], None, again_from=pos)
    head_end, tail_at = col.around_at + found.start(), col.around_at + found.end()
    pieces: list[Piece] = []
    if pos < head_end:
        if col.start > pos:
            return Step([], head_end, again_from=pos)
        pieces = _bytes_piece(col.chunk, col.start, pos, min(head_end, limit, col.start + len(col.chunk)))
        pos = pieces[-1].pos if pieces else pos
        if pos < head_end:  # the read, or `until`, ended inside the head
            return Step(pieces, head_end)
    tail_start = _tail_start(col, tail_at, pos, recent)
    if pos < tail_start and pos < limit:
        gap_end = min(tail_start, limit)
        pieces.append(Piece(f"\n[nexus-jobd: {gap_end - pos} bytes of {stream} not shown]\n", gap_end, note=True))
        pos = gap_end
    at = tail_at + (pos - tail_start)  # the column offset of `pos`
    if pos < limit and not col.start <= at < col.start + len(col.chunk):
        again = max(tail_at, at - RECENT_BYTES - 3)
        return Step(pieces, head_end, again_from=again if again != col.start else None)
    end = min(limit, tail_start + (col.start + len(col.chunk) - tail_at))
    if pos < end:
        pieces += _bytes_piece(col.chunk, col.start - tail_at + tail_start, pos, end)
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
    attempt: int = row["attempt"] if isinstance(row.get("attempt"), int) else 0
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
