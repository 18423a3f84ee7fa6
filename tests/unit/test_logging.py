"""Logging must never take the daemon down: found when the disk filled up under a daemon logging to a file."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator

import pytest
import structlog

from daemon import logging as log


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


class FullDisk(io.StringIO):
    """stderr on a full disk: every write fails; it keeps the lines it was handed (print writes the newline apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: list[str] = []

    def write(self, text: str) -> int:
        if text != "\n":
            self.tried.append(text)
        raise OSError(28, "No space left on device")

    def flush(self) -> None:
        raise OSError(28, "No space left on device")


def test_a_log_line_that_cannot_be_written_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FullDisk()
    monkeypatch.setattr(sys, "stderr", disk)
    log.configure("info", "json")
    logger = log.get("test")
    logger.error("db.write_failed", error="disk full")  # raising here would take the daemon down
    logger.info("job.finished", job_id="j1")  # and logging goes on: the next line is tried too
    # Each line reached the stream and was dropped there, not filtered out before.
    assert [json.loads(line)["event"] for line in disk.tried] == ["db.write_failed", "job.finished"]


def test_json_lines_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    log.configure("info", "json")
    log.get("test").info("job.claimed", job_id="j1")
    assert '"event": "job.claimed"' in out.getvalue() and '"job_id": "j1"' in out.getvalue()


def test_a_huge_value_is_logged_cut_to_its_start_and_end_with_its_true_length(monkeypatch: pytest.MonkeyPatch
                                                                               ) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    log.configure("info", "json")
    huge = "a" * 5_000_000 + "z"
    try:
        raise ValueError("b" * 3000)
    except ValueError:
        log.get("test").exception("job.claimed", tool=huge, argv=["bash", huge], env={"V": huge}, n=7)
    event = json.loads(out.getvalue())
    for value in (event["tool"], event["argv"][1], event["env"]["V"]):
        assert len(value) < 1100 and value.startswith("aaa") and "a…(5000001 chars)…a" in value
        assert value.endswith("z")
    assert (event["argv"][0], event["n"]) == ("bash", 7)
    assert "b" * 3000 in event["exception"]  # a traceback is kept whole


def test_a_python_warning_is_a_log_event_not_a_plain_text_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a library's DeprecationWarning went to stderr as two lines of text, in the middle of the JSON log."""
    import warnings

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    with warnings.catch_warnings():
        log.configure("info", "json")
        warnings.simplefilter("always")
        warnings.warn("this API is deprecated", DeprecationWarning, stacklevel=1)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    event = json.loads(lines[0])
    assert (event["event"], event["level"], event["category"]) == ("python.warning", "warning", "DeprecationWarning")
    assert event["message"] == "this API is deprecated" and "test_logging.py:" in event["where"]
