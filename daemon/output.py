"""Per-stream output capture: incremental UTF-8 decoding and a cap that keeps the head and the latest tail.

Memory per stream stays below 1.75x the cap (the tail is trimmed lazily), however much the job writes. Big
buffers get mappings of their own (`map_big_blocks_apart`), and once a big job is recorded, `trim_heap` gives
the free heap pages back: the idle daemon returns to its size before the job.
"""

from __future__ import annotations

import codecs
import ctypes
import re
from dataclasses import dataclass, field

from daemon.model import OutputSnapshot

HEAD_SHARE = 4  # the head keeps cap/4; the tail, where errors usually are, keeps the rest
# After a job that wrote at least this much (both streams), the dispatcher gives memory back: SQLite's page cache
# and the heap's free pages (its read buffers and renders leave them behind). Smaller jobs cost nothing extra.
BIG_OUTPUT_BYTES = 1024 * 1024
MMAP_THRESHOLD_BYTES = 1024 * 1024  # blocks this big or bigger get mappings of their own (glibc)
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_M_PURGE = -101  # bionic's mallopt(M_PURGE, 0): Android's malloc_trim (API level 28 and later)


def _complete_prefix(data: bytes | bytearray) -> int:
    """Length of `data` without a trailing UTF-8 sequence that more bytes could still complete."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte < 0x80:
            return n
        if byte >= 0xC0:  # a lead byte: is its sequence complete?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n if back >= need or byte > 0xF4 else n - back
    return n


def _skip_continuations(data: bytes | bytearray) -> int:
    """Bytes at the start of a cut tail that belong to a character whose start was dropped."""
    skip = 0
    while skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:
        skip += 1
    return skip


@dataclass
class StreamCapture:
    """One stream (stdout or stderr). `feed` bytes as they arrive; `render` the text the row should hold."""

    name: str
    cap: int
    total: int = 0
    dirty: bool = False
    _parts: list[str] = field(default_factory=list)  # decoded text while total <= cap
    _decoder: codecs.BufferedIncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _head: bytes | None = None  # set once the cap is passed
    _tail: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        self.dirty = True
        if self._head is None and self.total <= self.cap:
            self._parts.append(self._decoder.decode(data))
            return
        if self._head is None:
            self._overflow(data)
        else:
            self._tail += data
        tail_cap = self.cap - self.cap // HEAD_SHARE
        if len(self._tail) > 2 * tail_cap:  # trim lazily so a fast writer costs O(1) per byte, not O(cap)
            del self._tail[: len(self._tail) - tail_cap]

    @property
    def head_kept(self) -> bool:
        """Past the cap: the head is fixed, and only the last `tail_cap` bytes of what follows matter."""
        return self._head is not None

    @property
    def tail_cap(self) -> int:
        return self.cap - self.cap // HEAD_SHARE

    def skip(self, n: int) -> None:
        """`n` bytes the job wrote that were not read (a remote reader sends only the tail when it is far behind):
        counted in the total; at least `tail_cap` bytes follow, so the old tail is of no use any more."""
        if n <= 0:
            return
        if self._head is None:
            raise ValueError("bytes may be skipped only once the head is kept")
        self.total += n
        self._tail.clear()
        self.dirty = True

    def reset(self) -> None:
        """Forget everything: the stream is read again from its first byte (a keeper holds all a row needs)."""
        self.total = 0
        self.dirty = True
        self._parts = []
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._head = None
        self._tail = bytearray()

    def reseed(self, text: str | None, total: int) -> None:
        """Continue from what a row holds (a daemon that adopts a running job): past the cap, its head and tail
        are the row's text either side of the marker, and `total` the bytes already read. At or under the cap the
        capture stays empty and the job's spool is read again from its start (nothing of it was discarded), which
        is exact where the row's text could have held back a split character. Reading goes on from `self.total`."""
        if total <= self.cap:
            return
        marker = re.compile(rf"\n\[nexus-jobd: \d+ bytes of {self.name} omitted; {total} bytes in all\]\n")
        found = marker.search(text or "")
        head, tail = (text[: found.start()], text[found.end():]) if text and found else ("", "")
        self._parts = []
        self._head = head.encode("utf-8", "surrogatepass")
        self._tail = bytearray(tail.encode("utf-8", "surrogatepass"))
        self.total = total
        self.dirty = True

    def _overflow(self, data: bytes) -> None:
        """Past the cap for the first time: freeze the head as bytes, keep the rest as the tail."""
        text = "".join(self._parts)
        raw = text.encode("utf-8", "surrogatepass") + self._decoder.getstate()[0] + data
        # Re-encoding replaced bytes (U+FFFD) changes their length; count head and tail from the real total.
        head_len = self.cap // HEAD_SHARE
        self._head = raw[:head_len]
        self._tail = bytearray(raw[head_len:])
        self._parts = []

    def render(self, *, final: bool = False) -> str:
        """The text for the row. While running, a character split across reads is held back until whole."""
        self.dirty = False
        if self._head is None:
            text = "".join(self._parts)
            if final:
                text += self._decoder.decode(b"", final=True)
            self._parts = [text]
            return text
        head = self._head[: _complete_prefix(self._head)]
        tail_cap = self.cap - self.cap // HEAD_SHARE
        tail = bytes(self._tail[-tail_cap:])
        tail = tail[_skip_continuations(tail):]
        if not final:
            tail = tail[: _complete_prefix(tail)]
        omitted = self.total - len(head) - len(tail)
        marker = f"\n[nexus-jobd: {omitted} bytes of {self.name} omitted; {self.total} bytes in all]\n"
        return head.decode("utf-8", "replace") + marker + tail.decode("utf-8", "replace")


class JobOutput:
    """Both streams of one job, and the snapshot the store writes."""

    def __init__(self, cap: int) -> None:
        self.stdout = StreamCapture("stdout", cap)
        self.stderr = StreamCapture("stderr", cap)

    @property
    def dirty(self) -> bool:
        return self.stdout.dirty or self.stderr.dirty

    def reseed(self, stdout: str | None, stderr: str | None, stdout_bytes: int, stderr_bytes: int) -> None:
        """Continue from a row's output (see StreamCapture.reseed)."""
        self.stdout.reseed(stdout, stdout_bytes)
        self.stderr.reseed(stderr, stderr_bytes)

    def snapshot(self, *, final: bool = False) -> OutputSnapshot:
        """Render only what changed since the last snapshot (None leaves that column as it is)."""
        out = self.stdout.render(final=final) if self.stdout.dirty or final else None
        err = self.stderr.render(final=final) if self.stderr.dirty or final else None
        return OutputSnapshot(out, err, self.stdout.total, self.stderr.total)


# -- giving memory back ---------------------------------------------------------------------------------------


def is_big(snapshot: OutputSnapshot) -> bool:
    """Did the job write enough that the memory it took is worth giving back once it is recorded?"""
    return snapshot.stdout_bytes + snapshot.stderr_bytes >= BIG_OUTPUT_BYTES


def map_big_blocks_apart() -> bool:
    """glibc: every block of MMAP_THRESHOLD_BYTES or more gets a mapping of its own, unmapped when it is freed.

    By default glibc raises that threshold (up to 32 MiB) each time such a block is freed, so from the first big job
    on, its multi-MiB buffers (the capped text, its render, SQLite's copy of it) are carved out of the heaps, where
    small blocks allocated meanwhile pin their pages: up to 10 MiB stayed resident that malloc_trim could not
    return. Fixing the threshold keeps them apart; smaller blocks, and every small job, are unaffected. False
    where the C library is not glibc (its mallopt has no such parameter)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if getattr(libc, "malloc_trim", None) is None:  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def trim_heap() -> bool:
    """Return the C heap's free pages to the system: glibc's malloc_trim(0), or bionic's mallopt(M_PURGE). True if
    it released some; False too where the C library has neither (musl, macOS): there freed memory stays, reused."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if (malloc_trim := getattr(libc, "malloc_trim", None)) is not None:
        return bool(malloc_trim(0))
    if (mallopt := getattr(libc, "mallopt", None)) is not None:
        return bool(mallopt(_M_PURGE, 0))
    return False
