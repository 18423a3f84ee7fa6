"""daemon.store.driver.Rows and values: rows read by their columns' names, from SQLite's rows and from tuples alike."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from daemon.model import ClaimedJob, Worker
from daemon.store.driver import Rows, values

CLAIMED = ("id", "node_id", "tool", "command", "cwd", "env", "priority", "attempt", "started_at", "timeout_ms",
           "max_attempts", "created_at")


def sqlite_rows(columns: tuple[str, ...], *rows: tuple[Any, ...]) -> Rows:
    """The rows as the SQLite driver reads them: sqlite3.Row, which knows its columns."""
    conn = sqlite3.connect(":memory:")
    conn.row_factory = sqlite3.Row
    select = "SELECT " + ", ".join(f"? AS {name}" for name in columns)
    found = conn.execute(" UNION ALL ".join([select] * len(rows)), [v for row in rows for v in row]).fetchall()
    return Rows(found, tuple(found[0].keys()))


def claimed(job_id: str, **changes: Any) -> dict[str, Any]:
    return dict(zip(CLAIMED, (job_id, "n1", "bash", "true", None, None, 0, 1, 100, None, 1, 90), strict=True)) | changes


@pytest.mark.parametrize("source", ["tuples", "sqlite3.Row"])
def test_fields_are_taken_by_name_whatever_the_order_of_the_columns(source: str) -> None:
    columns = ("seq", *reversed(CLAIMED))  # the claim's extra column first, the rest backwards
    job = claimed("j1", priority=5, created_at=7)
    row = (3, *(job[name] for name in reversed(CLAIMED)))
    rows = sqlite_rows(columns, row) if source == "sqlite3.Row" else Rows([row], columns)
    assert values(ClaimedJob, rows) == [ClaimedJob(**job)]
    assert rows.first("seq") == 3 and rows.tuples("id", "priority") == [("j1", 5)]


def test_a_run_of_columns_and_scattered_ones_give_the_same_values() -> None:
    job = claimed("j1")
    in_order = Rows([(*job.values(), 9)], (*CLAIMED, "seq"))
    scattered = Rows([(9, *reversed(job.values()))], ("seq", *reversed(CLAIMED)))
    assert values(ClaimedJob, in_order) == values(ClaimedJob, scattered) == [ClaimedJob(**job)]


def test_trailing_fields_with_defaults_may_be_left_out() -> None:
    job = claimed("j1")
    rows = Rows([tuple(job.values())[:-1]], CLAIMED[:-1])  # adopt_job returns no created_at
    assert values(ClaimedJob, rows) == [ClaimedJob(**job | {"created_at": None})]


def test_a_field_the_statement_lacks_is_an_error_naming_it() -> None:
    columns = ("id", "host", "boot_id", "pid", "pid_start", "heartbeat_at")  # no `now`, which has no default
    with pytest.raises(TypeError, match="Worker's fields"):
        values(Worker, Rows([("w", "h", None, 1, None, 5)], columns))


def test_no_rows_read_as_nothing() -> None:
    empty = Rows([], ())  # SQLite tells no columns without a row
    assert values(ClaimedJob, empty) == [] and empty.column("id") == [] and empty.tuples("id", "x") == []
    assert empty.first("id") is None and empty.dicts() == [] and empty.filter("id", bool) == []


def test_filter_keeps_the_columns_and_dicts_name_every_column() -> None:
    rows = Rows([("a", 1), ("b", 2)], ("id", "n"))
    kept = rows.filter("id", {"b"}.__contains__)
    assert kept.columns == ("id", "n") and kept.dicts() == [{"id": "b", "n": 2}]
