"""Hypothesis-generated rows, wrong in every column, inserted among good ones into a running daemon: every bad row
ends failed with a reason, every good row completes, the daemon never stops."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Daemon, Db, wait_for

ANY_VALUE = st.one_of(
    st.none(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=False),
    st.text(max_size=50), st.binary(max_size=50),
    st.just("é" * 100_000),  # huge: past Linux's limit for one argument
)
ODD_IDS = st.one_of(st.text(min_size=1, max_size=40), st.integers(), st.binary(min_size=1, max_size=20))


@st.composite
def bad_rows(draw: st.DrawFn) -> dict[str, Any]:
    """A row that is wrong in at least one column (all others may be wrong too)."""
    row: dict[str, Any] = {
        "id": draw(st.one_of(st.uuids().map(str), ODD_IDS)),
        "node_id": draw(st.one_of(st.just("localhost"), st.just("ghost"), ANY_VALUE.filter(lambda v: v is not None))),
        "tool": draw(st.one_of(st.sampled_from(["bash", "git", "docker"]), ANY_VALUE.filter(lambda v: v is not None))),
        "command": draw(st.one_of(st.just("exit 1"), st.just(""), st.just("a\x00b"),
                                  ANY_VALUE.filter(lambda v: v is not None))),
        "cwd": draw(st.one_of(st.none(), st.just("/no/such/dir"), ANY_VALUE)),
        "env": draw(st.one_of(st.none(), st.just("[1]"), st.just("{"), st.just('{"A": {"b": 1}}'), ANY_VALUE)),
        "timeout_ms": draw(st.one_of(st.none(), st.just(0), st.just(-1), st.just(10**16), ANY_VALUE)),
        "max_attempts": draw(st.one_of(st.just(0), st.just(10**9), st.text(min_size=1, max_size=5))),
        "priority": draw(st.one_of(st.integers(min_value=-5, max_value=5), st.text(max_size=5))),
        "run_after": draw(st.one_of(st.none(), st.text(min_size=1, max_size=10), st.binary(min_size=1, max_size=4))),
    }
    return row


def _insert(db: Db, row: dict[str, Any]) -> int | None:
    """INSERT as another program might; rows SQLite itself rejects (NOT NULL, duplicate id) never exist."""
    columns = ", ".join([*row, "status", "created_at"])
    try:
        cur = db.conn.execute(f"INSERT INTO jobs ({columns}) VALUES ({', '.join('?' * len(row))}, 'queued', 1)",
                              list(row.values()))
    except (db.conn.IntegrityError, OverflowError):
        return None
    return cur.lastrowid


@settings(max_examples=4, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
    HealthCheck.filter_too_much])
@given(rows=st.lists(bad_rows(), min_size=40, max_size=40))
def test_fuzzed_rows_fail_with_a_reason_and_good_rows_complete(
        rows: list[dict[str, Any]], db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = getattr(test_fuzzed_rows_fail_with_a_reason_and_good_rows_complete, "daemon", None)
    if daemon is None or daemon.proc is None or daemon.proc.poll() is not None:
        daemon = daemon_factory().start()
        test_fuzzed_rows_fail_with_a_reason_and_good_rows_complete.daemon = daemon  # type: ignore[attr-defined]
    bad = [rowid for row in rows if (rowid := _insert(db, row)) is not None]
    good = [db.insert(f"echo good-{uuid.uuid4().hex[:6]}") for _ in range(5)]

    def all_final() -> bool:
        marks = ", ".join("?" * len(bad))
        waiting = db.conn.execute(f"SELECT count(*) FROM jobs WHERE rowid IN ({marks}) AND duration IS NULL",
                                  bad).fetchone()[0]
        return waiting == 0

    wait_for(all_final, timeout=60, message="every fuzzed row final")
    for rowid in bad:
        row = db.conn.execute("SELECT status, error, exit_code FROM jobs WHERE rowid = ?", (rowid,)).fetchone()
        # A fuzzed row that happens to be valid may run: it then ends by its own exit code. Any other way out
        # must say why.
        assert row["status"] in ("completed", "failed"), dict(row)
        if row["status"] == "failed" and row["exit_code"] is None:
            assert row["error"], dict(row)
    for job_id in good:
        assert db.wait_status(job_id)["status"] == "completed"
    assert daemon.proc.poll() is None, daemon.log()[-3000:]
    assert not daemon.events("job.internal_error"), daemon.events("job.internal_error")
