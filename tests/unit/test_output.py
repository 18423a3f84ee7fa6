"""daemon.output: incremental UTF-8 decoding per stream, the head+tail cap, and JobOutput snapshots."""

from __future__ import annotations

import codecs
import ctypes
import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.model import OutputSnapshot
from daemon.output import (
    BIG_OUTPUT_BYTES,
    HEAD_SHARE,
    JobOutput,
    StreamCapture,
    is_big,
    trim_heap,
)
from tests.conftest import require

REPLACEMENT = "\ufffd"
MARKER = re.compile(r"\n\[nexus-jobd: (\d+) bytes of (\w+) omitted; (\d+) bytes in all\]\n")
MIB = 1024 * 1024


def split_rendered(text: str) -> tuple[str, int, str, int, str]:
    """(head, omitted, stream name, total, tail) of a capped rendering; fails unless there is exactly one marker."""
    markers = MARKER.findall(text)
    assert len(markers) == 1, f"expected exactly one marker line, found {len(markers)}"
    match = MARKER.search(text)
    assert match is not None
    return (text[: match.start()], int(match.group(1)), match.group(2), int(match.group(3)),
            text[match.end():])


def feed_all(capture: StreamCapture, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        capture.feed(data[i: i + chunk])


# -- below the cap --------------------------------------------------------------------------------------------


def test_plain_text_renders_as_fed() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"hello ")
    capture.feed(b"world\n")
    assert capture.total == 12
    assert capture.render() == "hello world\n"
    assert capture.render(final=True) == "hello world\n"


def test_empty_feed_changes_nothing() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"")
    assert capture.total == 0
    assert not capture.dirty
    assert capture.render(final=True) == ""


def test_two_byte_char_split_across_feeds_renders_whole() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"caf\xc3")
    capture.feed(b"\xa9!")
    assert capture.render(final=True) == "café!"


@pytest.mark.parametrize("char", ["€", "한", "😀", "𝄞"])
def test_multibyte_char_split_at_every_position(char: str) -> None:
    encoded = char.encode()
    assert len(encoded) in (3, 4)
    data = b"<" + encoded + b">"
    for cut in range(1, len(data)):
        capture = StreamCapture("stdout", 1024)
        capture.feed(data[:cut])
        capture.feed(data[cut:])
        assert capture.render(final=True) == f"<{char}>", f"cut at byte {cut}"


@pytest.mark.parametrize("char", ["é", "€", "😀"])
def test_render_while_incomplete_holds_the_char_back(char: str) -> None:
    encoded = char.encode()
    for cut in range(1, len(encoded)):
        capture = StreamCapture("stdout", 1024)
        capture.feed(b"x" + encoded[:cut])
        early = capture.render()
        assert early == "x", f"cut at {cut}: an incomplete character must be held back, got {early!r}"
        capture.feed(encoded[cut:] + b"y")
        assert capture.render() == f"x{char}y"
        assert capture.render(final=True) == f"x{char}y"


def test_invalid_bytes_become_replacement_characters() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"a\xffb\xc3(c")  # 0xff is never valid; 0xc3 followed by '(' is a broken sequence
    assert capture.render(final=True) == f"a{REPLACEMENT}b{REPLACEMENT}(c"


def test_final_render_of_a_dangling_lead_byte_is_a_replacement_character() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"end\xe2\x82")
    assert capture.render() == "end"
    assert capture.render(final=True) == f"end{REPLACEMENT}"


def test_exactly_at_the_cap_is_not_truncated() -> None:
    data = b"z" * 1024
    capture = StreamCapture("stdout", 1024)
    feed_all(capture, data, 100)
    assert capture.render(final=True) == data.decode()
    assert MARKER.search(capture.render(final=True)) is None


# -- past the cap ---------------------------------------------------------------------------------------------


def test_twenty_mib_with_a_four_mib_cap_keeps_head_and_tail() -> None:
    cap = 4 * MIB
    data = random.Random(0).randbytes(10 * MIB).hex().encode()  # 20 MiB of distinguishable ASCII
    assert len(data) == 20 * MIB
    capture = StreamCapture("stdout", cap)
    largest_tail = 0
    for i in range(0, len(data), 64 * 1024):
        capture.feed(data[i: i + 64 * 1024])
        largest_tail = max(largest_tail, len(capture._tail))
    assert capture.total == 20 * MIB
    assert largest_tail <= 2 * cap, "the kept tail must stay bounded however much is written"

    head, omitted, name, total, tail = split_rendered(capture.render(final=True))
    head_len = cap // HEAD_SHARE
    assert name == "stdout"
    assert total == 20 * MIB
    assert head == data[:head_len].decode()
    assert tail == data[-(cap - head_len):].decode()
    assert omitted + len(head.encode()) + len(tail.encode()) == total
    assert omitted == 16 * MIB


def test_marker_names_the_stream() -> None:
    capture = StreamCapture("stderr", 1024)
    capture.feed(b"e" * 5000)
    _, omitted, name, total, _ = split_rendered(capture.render())
    assert (name, total, omitted) == ("stderr", 5000, 5000 - 1024)


def test_memory_stays_bounded_with_many_small_feeds() -> None:
    cap = 1024
    capture = StreamCapture("stdout", cap)
    for i in range(20_000):
        capture.feed(b"%05d\n" % i)
        assert len(capture._tail) <= 2 * cap
        assert capture._head is None or len(capture._head) <= cap
    _, _, _, total, tail = split_rendered(capture.render(final=True))
    assert total == 20_000 * 6
    assert tail.endswith("19998\n19999\n")


def test_overflow_render_holds_back_an_incomplete_tail_char() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"a" * 2000 + "€".encode()[:2])
    head, _, _, _, tail = split_rendered(capture.render())
    assert REPLACEMENT not in head + tail
    assert tail.endswith("a")
    capture.feed("€".encode()[2:])
    _, _, _, total, tail = split_rendered(capture.render())
    assert tail.endswith("a€")
    assert total == 2003


def test_char_split_exactly_where_the_cap_is_passed_survives() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"a" * 1023 + b"\xc3")  # 1024 bytes: still under the cap, the decoder holds the lead byte
    capture.feed(b"\xa9b")  # past the cap: the held byte must move into the kept bytes
    _, _, _, total, tail = split_rendered(capture.render())
    assert tail.endswith("aéb")
    assert REPLACEMENT not in tail
    assert total == 1026


def test_overflow_final_render_shows_a_dangling_lead_byte() -> None:
    capture = StreamCapture("stdout", 1024)
    capture.feed(b"a" * 2000 + b"\xf0\x9f")
    _, _, _, _, tail = split_rendered(capture.render(final=True))
    assert tail.endswith("a" + REPLACEMENT)


def test_chars_straddling_the_cut_points_produce_no_replacement() -> None:
    cap = 1024
    head_len = cap // HEAD_SHARE
    # shift the text at both ends so the head and the tail cuts fall at every byte of a 4-byte char
    for offset, suffix in itertools.product(range(4), range(4)):
        data = b"x" * offset + "😀".encode() * 2000 + b"y" * suffix
        for chunk in (1, 3, 7, 4096):
            capture = StreamCapture("stdout", cap)
            feed_all(capture, data, chunk)
            for final in (False, True):
                head, omitted, _, total, tail = split_rendered(capture.render(final=final))
                assert REPLACEMENT not in head + tail, f"offset {offset}, suffix {suffix}, chunk {chunk}, final={final}"
                assert data.decode().startswith(head)
                assert data.decode().endswith(tail)
                assert head_len - 3 <= len(head.encode()) <= head_len
                assert cap - head_len - 3 <= len(tail.encode()) <= cap - head_len
                assert omitted + len(head.encode()) + len(tail.encode()) == total == len(data)


def complete_text(fed: bytes) -> str:
    """What a non-final render may show of `fed`: everything but a trailing incomplete character."""
    return codecs.getincrementaldecoder("utf-8")().decode(fed)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=200),
       repeat=st.integers(min_value=1, max_value=30),
       cap=st.sampled_from([16, 64, 256, 1024]),
       chunks=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=50),
       render_every=st.integers(min_value=1, max_value=5))
def test_valid_utf8_in_random_chunks_renders_faithfully(text: str, repeat: int, cap: int, chunks: list[int],
                                                       render_every: int) -> None:
    text *= repeat
    data = text.encode()
    capture = StreamCapture("stdout", cap)
    position, step = 0, 0
    while position < len(data):
        size = chunks[step % len(chunks)]
        capture.feed(data[position: position + size])
        position += size
        step += 1
        if step % render_every == 0:
            check_rendering(capture.render(), data[:position], cap)
    final = capture.render(final=True)
    if len(data) <= cap:
        assert final == text
    else:
        check_rendering(final, data, cap)


def check_rendering(rendered: str, fed: bytes, cap: int) -> None:
    shown = complete_text(fed)
    if len(fed) <= cap:
        assert rendered == shown
        return
    head, omitted, _, total, tail = split_rendered(rendered)
    assert total == len(fed)
    assert shown.startswith(head)
    assert shown.endswith(tail)
    assert omitted + len(head.encode()) + len(tail.encode()) == total
    assert REPLACEMENT not in head + tail or REPLACEMENT in shown
    # the kept parts are as large as the cap allows, less the bytes of at most one cut character at each end
    head_len, held_back = cap // HEAD_SHARE, len(fed) - len(shown.encode())
    assert head_len - 3 <= len(head.encode()) <= head_len
    assert len(tail.encode()) >= min(cap - head_len, len(fed) - head_len) - 3 - held_back
    assert len(tail.encode()) <= cap - head_len


# -- JobOutput ------------------------------------------------------------------------------------------------


def test_snapshot_renders_only_streams_that_changed() -> None:
    output = JobOutput(1024)
    assert not output.dirty
    output.stdout.feed(b"out\n")
    assert output.dirty
    first = output.snapshot()
    assert (first.stdout, first.stderr, first.stdout_bytes, first.stderr_bytes) == ("out\n", None, 4, 0)
    assert not output.dirty

    again = output.snapshot()
    assert (again.stdout, again.stderr) == (None, None)
    assert (again.stdout_bytes, again.stderr_bytes) == (4, 0)

    output.stderr.feed(b"err\n")
    later = output.snapshot()
    assert (later.stdout, later.stderr, later.stderr_bytes) == (None, "err\n", 4)


def test_final_snapshot_renders_both_streams_and_flushes_incomplete_bytes() -> None:
    output = JobOutput(1024)
    output.stdout.feed(b"ok \xc3")
    assert output.snapshot().stdout == "ok "
    final = output.snapshot(final=True)
    assert final.stdout == f"ok {REPLACEMENT}"
    assert final.stderr == ""
    assert (final.stdout_bytes, final.stderr_bytes) == (4, 0)


# -- giving memory back -----------------------------------------------------------------------------------------


def test_only_jobs_that_wrote_a_lot_count_as_big() -> None:
    """What makes the dispatcher give memory back after recording a batch: both streams' totals, not the capped
    text, so a job that wrote 100 MB into a 4 MiB row counts."""
    assert not is_big(OutputSnapshot("x" * 1000, "", 1000, 0))
    assert not is_big(OutputSnapshot(None, None, BIG_OUTPUT_BYTES // 2, BIG_OUTPUT_BYTES // 2 - 1))
    assert is_big(OutputSnapshot(None, None, BIG_OUTPUT_BYTES // 2, BIG_OUTPUT_BYTES // 2))
    assert is_big(OutputSnapshot("capped", None, 100 * BIG_OUTPUT_BYTES, 0))


def test_trim_heap_returns_freed_heap_pages_where_malloc_trim_exists() -> None:
    """Blocks below malloc's mmap threshold, every other one freed: holes inside the heap that free() cannot give
    back by itself, and that malloc_trim(0) does. Where the C library has no malloc_trim, it says so and returns."""
    glibc = getattr(ctypes.CDLL(None), "malloc_trim", None) is not None
    if not glibc:
        assert trim_heap() in (True, False)
    require(glibc, "no malloc_trim in this C library (not glibc): nothing to give back with")
    blocks = [bytearray(64 * 1024) for _ in range(400)]
    del blocks[::2]
    assert trim_heap() is True


def test_skipped_bytes_count_in_the_total_and_the_tail_is_what_came_after() -> None:
    """A remote reader far behind sends the head, then skips to the tail: the row is as if all had been fed."""
    whole, skipping = StreamCapture("stdout", 1000), StreamCapture("stdout", 1000)
    data = bytes(random.Random(1).choice(b"abc\n") for _ in range(50_000))
    whole.feed(data)
    skipping.feed(data[:1001])
    with pytest.raises(ValueError, match="head is kept"):
        StreamCapture("stdout", 1000).skip(5)  # only once the head is kept
    skipping.skip(50_000 - 1001 - 750)
    skipping.feed(data[-750:])
    assert skipping.total == whole.total == 50_000
    assert skipping.render(final=True) == whole.render(final=True)


def test_reseeding_from_a_row_goes_on_as_if_never_interrupted() -> None:
    data = "".join(f"line {i}\n" for i in range(3000)).encode()
    whole, first = JobOutput(4096), JobOutput(4096)
    whole.stdout.feed(data)
    first.stdout.feed(data[:20_000])
    row = first.snapshot()
    assert row.stdout is not None
    adopted = JobOutput(4096)
    adopted.reseed(row.stdout, None, row.stdout_bytes, 0)
    assert adopted.stdout.total == 20_000 and adopted.stdout.head_kept
    adopted.stdout.feed(data[20_000:])
    assert adopted.snapshot(final=True).stdout == whole.snapshot(final=True).stdout


def test_reseeding_at_or_under_the_cap_starts_from_zero() -> None:
    """Under the cap nothing of the spool was discarded: it is read again from its start, exactly."""
    adopted = JobOutput(4096)
    adopted.reseed("partial", "", 7, 0)
    assert (adopted.stdout.total, adopted.stdout.head_kept) == (0, False)
