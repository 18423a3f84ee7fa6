"""Every row ends final by the README's rule, on every path into `cancelled`; prune never breaks a waiting row;
dependency cycles fail at once (issue 15 items 10 and 11, issue 13 item 4)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.conftest import Daemon, Db, cli, daemon_looked, now_ms, wait_for

GUARDED_CANCEL = ("UPDATE jobs SET status = 'cancelled', completed_at = ? "
                  "WHERE id = ? AND status IN ('queued', 'executing')")


def is_final(row: dict[str, Any]) -> bool:
    """The README's rule, as a program polling the table applies it."""
    return row["duration"] is not None or (row["status"] == "cancelled" and row["started_at"] is None)


def cancel(db: Db, job_id: str) -> dict[str, Any]:
    """Cancel as a careful program does; the row as the cancel left it."""
    assert db.conn.execute(GUARDED_CANCEL, (now_ms(), job_id)).rowcount == 1
    return db.job(job_id)


def left_alone(db: Db, job_id: str, as_cancelled: dict[str, Any], *, due: int | None = None) -> None:
    """The daemon had every chance to act on the row (its run_after passed, then the daemon went through the
    queue) and left it as the cancel did: final, never started again."""
    if due is not None:
        wait_for(lambda: now_ms() > due, timeout=10, message="the row's run_after")
    daemon_looked(db)
    assert db.job(job_id) == as_cancelled


def test_cancelled_before_it_started_or_while_it_runs_is_final(daemon: Daemon, db: Db) -> None:
    due = now_ms() + 1500
    waiting = db.insert("true", run_after=due)
    row = cancel(db, waiting)
    assert is_final(row)
    running = db.insert("sleep 30")
    wait_for(lambda: db.job(running)["pid"], message="job running")
    cancel(db, running)
    ran = db.wait_status(running, ("cancelled",))
    assert is_final(ran) and ran["duration"] is not None and ran["attempt"] == 1
    left_alone(db, waiting, row, due=due)
    left_alone(db, running, ran)


def test_cancelled_while_waiting_for_a_retry_is_final(daemon_factory: Callable[..., Daemon], db: Db) -> None:
    # The retry comes 1.5 to 3 s after the first attempt: long enough to cancel it first, short enough to wait for.
    daemon_factory("[daemon]\nretry_backoff_ms = 3000\nretry_backoff_max_ms = 3000\n").start()
    job_id = db.insert("echo try; exit 3", max_attempts=3)
    row = wait_for(lambda: (r := db.job(job_id))["status"] == "queued" and r["attempt"] == 1 and r, timeout=15,
                   message="the first attempt failed and waits for its retry")
    assert row["started_at"] is None and row["exit_code"] == 3 and row["stdout"] == "try\n"  # last attempt kept
    row = cancel(db, job_id)
    assert is_final(row)
    left_alone(db, job_id, row, due=row["run_after"])


def test_cancelled_after_a_shutdown_requeue_is_final(daemon_factory: Callable[..., Daemon], db: Db) -> None:
    config = '[daemon]\non_stop = "drain"\nshutdown_grace_ms = 0\nkill_grace_ms = 100\n'
    first = daemon_factory(config).start()
    job_id = db.insert("sleep 30", max_attempts=2)
    wait_for(lambda: db.job(job_id)["pid"], message="job running")
    assert first.stop() == 0
    row = db.job(job_id)
    assert (row["status"], row["started_at"], row["attempt"]) == ("queued", None, 1), row
    row = cancel(db, job_id)
    assert is_final(row)
    daemon_factory(config).start()  # the next daemon neither runs it again nor recovers it
    left_alone(db, job_id, row)


def test_prune_keeps_a_row_that_a_queued_row_depends_on(daemon: Daemon, db: Db) -> None:
    parent = db.insert("echo parent")
    old = db.insert("echo old")
    db.wait_status(parent)
    db.wait_status(old)
    child = db.insert("echo child", depends_on=parent, run_after=now_ms() + 3_000)
    cli(db, "prune", "--older-than", "0s")
    ids = {r[0] for r in db.conn.execute("SELECT id FROM jobs")}
    assert parent in ids and old not in ids
    row = db.wait_status(child, timeout=20)
    assert (row["status"], row["stdout"]) == ("completed", "child\n")


def test_a_dependency_cycle_of_any_length_fails_at_once(daemon: Daemon, db: Db) -> None:
    db.conn.execute("BEGIN")
    a, b, c = "cycle-a", "cycle-b", "cycle-c"
    db.insert("true", id=a, depends_on=b)
    db.insert("true", id=b, depends_on=c)
    db.insert("true", id=c, depends_on=a)
    two_x = db.insert("true", id="cycle-x", depends_on="cycle-y")
    two_y = db.insert("true", id="cycle-y", depends_on="cycle-x")
    outside = db.insert("true", depends_on=a)
    db.conn.execute("COMMIT")
    for job_id in (a, b, c):
        error = db.wait_status(job_id)["error"]
        assert error.startswith("dependency cycle: ") and all(i in error for i in (a, b, c)), error
    for job_id in (two_x, two_y):
        assert "dependency cycle: " in db.wait_status(job_id)["error"]
    assert "ended failed" in db.wait_status(outside)["error"]
