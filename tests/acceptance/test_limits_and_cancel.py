"""Concurrency limits, priority order, cancel by another program, and a clean stop on SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, Db, cli, daemon_looked, group_members, wait_for

# The contract holds on either database: each test runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.backends("sqlite", "postgres")


def _concurrency_probe(slots: Path) -> str:
    """A job that records how many jobs were inside the section at once (one file per running job)."""
    return (f"touch {slots}/$$; sleep 0.3; ls {slots} | wc -l > {slots}.seen.$$; rm {slots}/$$; "
            f"cat {slots}.seen.$$")


def _most_at_once(db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, config: str, jobs: int) -> int:
    """A daemon with `config` runs `jobs` probes queued together: how many ran at once, at the most."""
    daemon_factory(config=config).start()
    slots = tmp_path / "slots"
    slots.mkdir()
    job_ids = [db.insert(_concurrency_probe(slots)) for _ in range(jobs)]
    return max(int(db.wait_status(job_id)["stdout"]) for job_id in job_ids)


def test_global_limit_caps_concurrent_jobs(db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    assert _most_at_once(db, daemon_factory, tmp_path, "[daemon]\nmax_concurrent = 2\n", 6) == 2


def test_per_node_limit_is_tighter_than_the_global_one(db: Db, daemon_factory: Callable[..., Daemon],
                                                       tmp_path: Path) -> None:
    config = "[daemon]\nmax_concurrent = 4\n[nodes.localhost]\nmax_concurrent = 1\n"
    assert _most_at_once(db, daemon_factory, tmp_path, config, 3) == 1


def test_the_global_limit_holds_where_a_node_allows_more(db: Db, daemon_factory: Callable[..., Daemon],
                                                         tmp_path: Path) -> None:
    config = "[daemon]\nmax_concurrent = 2\n[nodes.localhost]\nmax_concurrent = 4\n"
    assert _most_at_once(db, daemon_factory, tmp_path, config, 6) == 2


def test_higher_priority_runs_first_then_oldest(db: Db, daemon_factory: Callable[..., Daemon],
                                                tmp_path: Path) -> None:
    daemon_factory(config="[daemon]\nmax_concurrent = 1\n").start()
    gate = tmp_path / "gate"
    blocker = db.insert(f"while [ ! -e {gate} ]; do sleep 0.02; done")
    db.wait_status(blocker, ("executing",))
    db.conn.execute("BEGIN")
    low = db.insert("true", created_at=1)
    high_old = db.insert("true", priority=5, created_at=2)
    high_new = db.insert("true", priority=5, created_at=3)
    db.conn.execute("COMMIT")
    gate.touch()
    order = sorted((low, high_old, high_new), key=lambda j: db.wait_status(j)["started_at"])
    assert order == [high_old, high_new, low]


def _group_alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def test_cancel_by_another_program_kills_the_whole_group_and_keeps_output(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo started; echo $$; sleep 1000 & sleep 1000; wait")
    row = wait_for(lambda: (r := db.job(job_id))["stdout"] and len(r["stdout"].split()) == 2 and r,
                   message="job printed its pid")
    pgid = int(row["stdout"].split()[1])
    assert _group_alive(pgid)
    # NexusCLI's cancel, verbatim.
    cancelled_at = time.monotonic()
    db.conn.execute("UPDATE jobs SET status = ?, completed_at = ? WHERE id = ?", ("cancelled", 1, job_id))
    wait_for(lambda: not _group_alive(pgid), timeout=5, interval=0.001, message="process group gone")
    print(f"cancel to dead process group: {(time.monotonic() - cancelled_at) * 1000:.1f} ms")
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, message="cancel recorded")
    assert (row["status"], row["exit_code"]) == ("cancelled", 128 + signal.SIGTERM)
    assert row["stdout"].startswith("started\n")
    assert row["completed_at"] - row["started_at"] == row["duration"] >= 0


def test_cancel_kills_a_job_that_ignores_sigterm_after_the_grace(db: Db, daemon_factory: Callable[..., Daemon]
                                                                 ) -> None:
    daemon_factory(config="[daemon]\nkill_grace_ms = 300\n").start()
    job_id = db.insert("trap '' TERM; echo ready; while true; do sleep 0.05; done")
    wait_for(lambda: db.job(job_id)["stdout"] == "ready\n", message="job ready")
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=10, message="cancel")
    assert (row["status"], row["exit_code"]) == ("cancelled", 128 + signal.SIGKILL)


def _stop(db: Db, job_id: str, how: str) -> dict[str, Any]:
    """Cancel the job as NexusCLI does, or let its 2 s timeout expire; the final row."""
    if how == "cancel":
        db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
    return db.wait_status(job_id, timeout=15)


def _stopped_as_said(row: dict[str, Any], how: str, exit_code: int) -> None:
    """Cancelled, or timed out (124); either way the first attempt, and no other."""
    expected = ("cancelled", exit_code) if how == "cancel" else ("failed", 124)
    assert (row["status"], row["exit_code"], row["attempt"]) == (*expected, 1), row


@pytest.mark.backends("sqlite")  # signals, not the database
@pytest.mark.parametrize("keeper", [True, False], ids=["keeper", "no-keeper"])
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_sigterm_reaches_every_process_of_the_group(db: Db, daemon_factory: Callable[..., Daemon],
                                                    tmp_path: Path, how: str, keeper: bool) -> None:
    """A child in the job's group (not its leader) that cleans up on TERM gets to: the README promises SIGTERM
    to the whole group. (Were only the leader signalled, the final SIGKILL of the group would hide it.)"""
    daemon_factory(config=f"[daemon]\nkill_grace_ms = 3000\nkeeper = {str(keeper).lower()}\n").start()
    mark = tmp_path / "child-got-term"
    child = f"trap 'touch {mark}; exit 0' TERM; echo child-ready; while :; do sleep 0.05; done"
    job_id = db.insert(f'sh -c "{child}" & wait', timeout_ms=2000 if how == "timeout" else None)
    wait_for(lambda: db.job(job_id)["stdout"] == "child-ready\n", message="the child's trap set")
    row = _stop(db, job_id, how)
    _stopped_as_said(row, how, 128 + signal.SIGTERM)
    wait_for(mark.exists, timeout=5, message="the child's TERM trap to run")


@pytest.mark.backends("sqlite")  # signals, not the database
@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_a_job_cleans_up_within_the_kill_grace(db: Db, daemon_factory: Callable[..., Daemon], how: str) -> None:
    """SIGKILL comes kill_grace_ms after SIGTERM, not with it: a trap that takes 0.3 s finishes its work."""
    daemon_factory(config="[daemon]\nkill_grace_ms = 3000\n").start()
    job_id = db.insert("trap 'sleep 0.3; echo cleaned; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
                       timeout_ms=2000 if how == "timeout" else None)
    wait_for(lambda: db.job(job_id)["stdout"] == "ready\n", message="the trap set")
    row = _stop(db, job_id, how)
    _stopped_as_said(row, how, 0)
    assert row["stdout"] == "ready\ncleaned\n"


def test_cli_cancel_does_what_nexuscli_does(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo go; sleep 1000")
    wait_for(lambda: db.job(job_id)["stdout"] == "go\n", message="running")
    assert f"{job_id}: cancelled" in cli(db, "cancel", job_id[:8]).stdout
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, message="cancel")
    assert row["status"] == "cancelled"


def test_sigterm_lets_running_jobs_finish_then_exits_0(draining_daemon: Daemon, db: Db,
                                                       tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    job_id = db.insert(f"echo working; while [ ! -e {gate} ]; do sleep 0.02; done; echo finished")
    wait_for(lambda: db.job(job_id)["stdout"] == "working\n", message="running")
    assert draining_daemon.proc is not None
    draining_daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: draining_daemon.events("dispatch.draining"), message="draining")
    queued = db.insert("echo too late")
    gate.touch()
    assert draining_daemon.proc.wait(15) == 0
    row = db.job(job_id)
    assert (row["status"], row["stdout"]) == ("completed", "working\nfinished\n")
    assert db.job(queued)["status"] == "queued"  # not claimed while draining


def test_second_sigterm_stops_running_jobs_at_once(draining_daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo working; sleep 1000")
    polite = db.insert("trap 'echo bye; exit 0' TERM; echo working; while true; do sleep 0.05; done")
    wait_for(lambda: db.job(job_id)["stdout"] == "working\n" == db.job(polite)["stdout"], message="running")
    assert draining_daemon.proc is not None
    draining_daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: draining_daemon.events("dispatch.draining"), message="draining")
    draining_daemon.proc.send_signal(signal.SIGTERM)
    assert draining_daemon.proc.wait(15) == 0
    row = db.job(job_id)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 128 + signal.SIGTERM, 1)
    assert row["error"] == "daemon shut down while the job was running"
    assert row["stdout"] == "working\n"
    # Exiting 0 on SIGTERM is not finishing the work: the row says it was cut short.
    row = db.job(polite)
    assert (row["status"], row["exit_code"], row["stdout"], row["attempt"]) == ("failed", 0, "working\nbye\n", 1)
    assert row["error"] == "daemon shut down while the job was running"


def test_cancel_while_draining_still_kills_the_job(draining_daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo working; sleep 1000")
    wait_for(lambda: db.job(job_id)["stdout"] == "working\n", message="running")
    assert draining_daemon.proc is not None
    draining_daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: draining_daemon.events("dispatch.draining"), message="draining")
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (job_id,))
    assert draining_daemon.proc.wait(15) == 0
    row = db.job(job_id)
    assert (row["status"], row["exit_code"]) == ("cancelled", 128 + signal.SIGTERM)


def test_a_job_unblocked_by_its_dependency_keeps_its_priority(db: Db, daemon_factory: Callable[..., Daemon],
                                                              tmp_path: Path) -> None:
    """The slot its dependency frees goes to the highest priority among the rows that can run once that dependency
    is recorded as completed: not to whatever could run a moment before the record. (Of rows the daemon has seen:
    one inserted as the dependency ends may come too late for that slot, as for any scheduler.)"""
    daemon_factory(config="[daemon]\nmax_concurrent = 1\n").start()
    for _ in range(3):
        gate = tmp_path / f"gate-{_}"
        first = db.insert(f"while [ ! -e {gate} ]; do sleep 0.02; done")
        db.wait_status(first, ("executing",))
        db.conn.execute("BEGIN")
        low = db.insert("true", priority=0, created_at=1)
        high = db.insert("true", priority=100, depends_on=first)
        db.conn.execute("COMMIT")
        daemon_looked(db)
        gate.touch()
        assert db.wait_status(high)["started_at"] <= db.wait_status(low)["started_at"]
        assert db.job(high)["started_at"] >= db.job(first)["completed_at"]
