"""daemon.web.follow: a stream followed by byte offsets, through the output cap's head, marker and sliding tail,
gives every byte once and in order (or says how many it skipped); cursors; the charts' arithmetic."""

from __future__ import annotations

import random

import pytest

from daemon.output import StreamCapture
from daemon.store.console import MARKER_ROOM
from daemon.web import charts
from daemon.web.auth import host_allowed
from daemon.web.follow import RECENT_BYTES, Column, Cursor, read_offset, recent_after, step


class Reader:
    """A client following one stream's column the way feeds.look does: read from read_offset (with the marker's
    place as a hint once known), step, repeat; the column read as Store.job_output_since reads it."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        self.pos, self.head, self.text, self.max, self.recent = 0, None, "", max_bytes, b""

    def look(self, column: str, total: int) -> None:
        data = column.encode()
        start = read_offset(self.pos, self.head)
        for _ in range(64):
            col = read(data, total, start, self.head, self.max)
            result = step("stdout", self.pos, self.head, col, recent=self.recent)
            self.head = result.head
            self.recent = recent_after(self.recent, result.pieces)
            for piece in result.pieces:
                self.text += piece.text
                self.pos = piece.pos
            if result.again_from is not None:
                start = result.again_from
            elif len(col.chunk) == self.max and result.pieces:
                start = read_offset(self.pos, self.head)
            else:
                return


def read(data: bytes, total: int, start: int, hint: int | None, max_bytes: int) -> Column:
    """What Store.job_output_since's query returns for one stream."""
    if start < 0:
        start = max(0, len(data) - (total + start))
    if hint is not None:
        around_at = hint
    else:
        found = data.find(f" bytes of stdout omitted; {total} bytes in all]\n".encode())
        around_at = max(0, found - MARKER_ROOM) if found >= 0 else -1
    around = data[around_at:around_at + MARKER_ROOM + 160] if around_at >= 0 else b""
    return Column(start, data[start:start + max_bytes], len(data), total, around_at, around)


def written(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    return "".join(rng.choice(["line ", "é", "日本", "x\n", "🙂"]) for _ in range(n)).encode()


def test_an_uncut_stream_is_followed_exactly_in_any_pieces() -> None:
    data = written(1, 3000)
    capture, reader = StreamCapture("stdout", cap=1 << 20), Reader(max_bytes=97)
    rng = random.Random(2)
    at = 0
    while at < len(data):
        n = rng.randint(1, 200)
        capture.feed(data[at:at + n])
        at += n
        reader.look(capture.render(), capture.total)
    reader.look(capture.render(final=True), capture.total)
    assert reader.text == data.decode()


@pytest.mark.parametrize("seed", range(5))
def test_a_stream_past_the_cap_is_followed_byte_for_byte_when_read_often_enough(seed: int) -> None:
    """The row keeps a head and a tail of 3/4 of the cap: a reader that looks before the tail slides past what it
    has gets every byte, across the cut, with no marker and no repeat."""
    cap = 4096
    data = written(seed, 20000)
    capture, reader = StreamCapture("stdout", cap=cap), Reader()
    rng = random.Random(seed)
    at = 0
    while at < len(data):
        n = rng.randint(1, cap // 2)
        capture.feed(data[at:at + n])
        at += n
        reader.look(capture.render(), capture.total)
    reader.look(capture.render(final=True), capture.total)
    assert "omitted" not in reader.text and "not shown" not in reader.text
    assert reader.text == data.decode()


def test_a_reader_that_joins_late_gets_the_head_then_says_how_much_it_skipped() -> None:
    cap = 4096
    data = "".join(f"{i:06d}\n" for i in range(5000)).encode()  # 35000 bytes: most of it is cut
    capture = StreamCapture("stdout", cap=cap)
    capture.feed(data)
    text = capture.render(final=True)
    reader = Reader(max_bytes=500)
    reader.look(text, capture.total)
    head = cap // 4
    tail = cap - head
    assert reader.text.startswith(data[:head].decode())
    assert f"[nexus-jobd: {len(data) - head - tail} bytes of stdout not shown]" in reader.text
    assert reader.text.endswith(data[-tail:].decode()) and reader.pos == len(data)
    before = reader.text
    reader.look(text, capture.total)  # nothing new: nothing more
    assert reader.text == before


def test_a_catch_up_stops_where_it_was_told() -> None:
    data = b"0123456789" * 10
    col = Column(0, data, len(data), len(data))
    result = step("stdout", 5, None, col, until=42)
    assert "".join(p.text for p in result.pieces) == data[5:42].decode() and result.pieces[-1].pos == 42


def test_a_read_that_does_not_reach_where_the_client_is_asks_for_the_right_offset() -> None:
    capture = StreamCapture("stdout", cap=2048)
    lines = "".join(f"{i:05d}\n" for i in range(2000))
    capture.feed(lines.encode())
    data = capture.render().encode()
    tail_at = data.index(b"in all]\n") + len(b"in all]\n")
    # A client at 11000 of 12000: in the tail, past what a 100-byte read from the marker holds.
    col = read(data, 12000, 500, 500, 100)
    result = step("stdout", 11000, 512, col)
    at = tail_at + (11000 - (12000 - (len(data) - tail_at)))
    assert result.pieces == [] and result.again_from == at - RECENT_BYTES - 3
    assert "".join(p.text for p in step("stdout", 11000, 512, read(data, 12000, at, 512, 1 << 20)).pieces) == \
        lines[11000:]
    # Read as the feed reads a cut column: counted back from the end, a little before where the client is.
    assert read_offset(11000, 512) == -(11000 - RECENT_BYTES - 3)
    col = read(data, 12000, read_offset(11000, 512), 512, 1 << 20)
    assert "".join(p.text for p in step("stdout", 11000, 512, col).pieces) == lines[11000:]


def test_cursor_text_round_trips_and_anything_else_is_refused() -> None:
    cursor = Cursor(3, 1024, 7, "executing")
    assert Cursor.parse(cursor.text()) == cursor
    for bad in ("", "1.2.3", "1.2.3.running", "a.2.3.done", "-1.0.0.", "1.2.3.done.4"):
        with pytest.raises(ValueError, match="Last-Event-ID"):
            Cursor.parse(bad)


def test_charts_count_per_bucket_and_reconstruct_queue_depth() -> None:
    now = 10 * 3_600_000
    minute = 60_000
    rows = [(now - 30 * minute, None, now - 29 * minute, now - 28 * minute, "completed"),  # waited 1 min
            (now - 30 * minute, None, now - 20 * minute, now - 10 * minute, "failed"),  # waited 10 min
            (now - 5 * minute, None, None, None, "queued")]  # still waiting
    stats = charts.stats(rows, now_ms=now, hours=1)
    assert stats["bucketMs"] == minute and sum(stats["finished"]["completed"]) == 1
    assert sum(stats["finished"]["failed"]) == 1
    assert stats["queueDepth"][-1] == 1 and stats["queueDepth"][60 - 25] == 1  # 25 minutes ago: the second waits
    assert max(v for v in stats["pickupMs"]["p50"] if v is not None) == 10 * minute


@pytest.mark.parametrize(("host", "ok"), [("127.0.0.1:9480", True), ("[::1]:9480", True), ("localhost:9480", True),
                                          ("10.1.2.3", True), ("phone.lan:80", True), ("evil.example:9480", False),
                                          ("localhost.evil.example", False), ("", False), (None, False)])
def test_host_header_names_or_ip_addresses(host: str | None, ok: bool) -> None:
    assert host_allowed(host, frozenset({"localhost", "phone.lan"})) is ok


def test_the_store_looks_for_the_marker_where_daemon_output_puts_it() -> None:
    from daemon.output import HEAD_SHARE
    from daemon.store.console import CAP_HEAD_SHARE

    assert CAP_HEAD_SHARE == HEAD_SHARE
    capture = StreamCapture("stdout", cap=4096)
    capture.feed(b"y\n" * 50_000)
    data = capture.render().encode()
    assert data.index(b" bytes of stdout omitted") < len(data) // CAP_HEAD_SHARE + 256
