"""Lifecycle guarantees with real processes and real signals: timeouts, crash recovery, exactly once, retries,
scheduling and dependencies."""

from __future__ import annotations

import itertools
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, Db, cli, group_members, now_ms, wait_for

# The contract holds on either database: each test runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.backends("sqlite", "postgres")


def test_timeout_fails_with_124_and_says_how_long(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config="[daemon]\nkill_grace_ms = 300\n").start()
    # 1 s: time for bash to print and set its trap on a loaded box before the TERM comes.
    polite = db.insert("echo start; sleep 30", timeout_ms=1000)
    stubborn = db.insert("trap '' TERM; echo start; while true; do sleep 0.05; done", timeout_ms=1000)
    for job_id in (polite, stubborn):
        row = db.wait_status(job_id, timeout=15)
        assert (row["status"], row["exit_code"], row["stdout"], row["attempt"]) == ("failed", 124, "start\n", 1)
        assert row["error"] == "timed out after 1s (timeout_ms=1000) and was killed"
        assert row["duration"] >= 1000


def test_default_timeout_applies_to_rows_without_one(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config="[daemon]\ndefault_timeout_ms = 200\n").start()
    row = db.wait_status(db.insert("sleep 30"), timeout=15)
    assert (row["status"], row["exit_code"], row["attempt"]) == ("failed", 124, 1)


def test_kill_9_then_restart_recovers_every_job_and_leaves_no_orphan(
        db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """Jobs that died with their daemon (keeper = false: its own children; with a keeper, see test_keeper)."""
    first = daemon_factory("[daemon]\nkeeper = false\n").start()
    jobs = [db.insert(f"echo out-{i}; echo $$; sleep 1000", max_attempts=2 if i % 2 else 1) for i in range(5)]
    rows = [wait_for(lambda j=j: (r := db.job(j))["pid"] and r["stdout"].count("\n") == 2 and r,
                     message="pid and output recorded") for j in jobs]
    pgids = [int(r["stdout"].split()[1]) for r in rows]
    assert [r["pid"] for r in rows] == pgids
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    assert all(group_members(pgid) for pgid in pgids)  # the orphans are still running

    killed_at = time.monotonic()
    daemon_factory("[daemon]\nkeeper = false\n").start()

    def recovered() -> bool:
        return all(db.job(j)["worker_id"] != rows[0]["worker_id"] or db.job(j)["status"] != "executing"
                   for j in jobs)

    wait_for(recovered, timeout=5, message="recovery of the dead daemon's jobs")
    recovery_s = time.monotonic() - killed_at
    wait_for(lambda: not any(group_members(pgid) for pgid in pgids), timeout=5, message="orphans killed")
    for i, job_id in enumerate(jobs):
        row = db.job(job_id)
        if i % 2:  # may try again: re-queued, then claimed again as attempt 2 by the new daemon
            row = wait_for(lambda j=job_id: (r := db.job(j))["attempt"] == 2 and r["status"] == "executing" and r,
                           message="the re-queued job running again")
            assert row["error"] is None  # the claim cleared the dead attempt's error and output
        else:
            assert (row["status"], row["error"], row["attempt"]) == (
                "failed", "daemon stopped while the job was running", 1)
            assert row["stdout"].startswith(f"out-{i}\n")  # output written before the kill is kept
    print(f"recovery after kill -9 and restart: {recovery_s:.2f}s")


def test_two_daemons_run_1000_jobs_exactly_once(db: Db, daemon_factory: Callable[..., Daemon],
                                                tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    daemon_factory().start()
    daemon_factory().start()
    db.conn.execute("BEGIN")
    # 50 ms each: with instant jobs the first daemon writes so often that SQLite's busy handler (a sleep-and-retry,
    # not a queue) can keep the second one's writes, its claims among them, waiting until every job is done (seen
    # once in CI: 1000 jobs, one worker). Exactly once across two daemons needs both to take part.
    jobs = [db.insert(f"echo {i} >> {ledger}; sleep 0.05") for i in range(1000)]
    db.conn.execute("COMMIT")

    def all_final() -> bool:
        return db.conn.execute("SELECT count(*) FROM jobs WHERE duration IS NOT NULL").fetchone()[0] == 1000

    wait_for(all_final, timeout=120, interval=0.1, message="1000 jobs final")
    runs = Counter(ledger.read_text().split())
    assert len(runs) == 1000 and set(runs.values()) == {1}, [k for k, v in runs.items() if v != 1][:10]
    rows = {r[0]: (r[1], r[2]) for r in db.conn.execute("SELECT id, status, attempt FROM jobs")}
    assert rows == dict.fromkeys(jobs, ("completed", 1))  # each of them, once, in its first attempt
    workers = {r[0] for r in db.conn.execute("SELECT DISTINCT worker_id FROM jobs")}
    assert len(workers) == 2  # both daemons took part


def _stop_outside_a_write(proc: subprocess.Popen[bytes], db_path: Path) -> None:
    """SIGSTOP, but not in the middle of a write: stopped holding the write lock, the daemon would block the rescuer
    (a real hazard of SIGSTOP, not what this test is about). Stopped for sure, then the lock must be free."""
    for _ in range(50):
        proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
                 message="stopped")
        probe = sqlite3.connect(db_path, timeout=0.2)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.rollback()
            return
        except sqlite3.OperationalError:
            proc.send_signal(signal.SIGCONT)
        finally:
            probe.close()
    raise AssertionError("the daemon held the write lock at every stop")


@pytest.mark.backends("sqlite")  # stops the daemon outside a SQLite write
@pytest.mark.parametrize("keeper", [True, False])
def test_a_stalled_daemon_loses_its_lease_and_cannot_finish_late(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, keeper: bool) -> None:
    config = f"[daemon]\nlease_ttl_ms = 1000\nkill_grace_ms = 200\nkeeper = {str(keeper).lower()}\n"
    stalled = daemon_factory(config=config).start()
    job_id = db.insert("echo $$; sleep 1000", max_attempts=2)
    row = wait_for(lambda: (r := db.job(job_id))["pid"] and r, message="running")
    assert stalled.proc is not None
    _stop_outside_a_write(stalled.proc, db.path)  # alive, but no heartbeat
    try:
        rescuer = daemon_factory(config=config).start()
        if keeper:
            # The rescuer declares the stalled daemon dead once its lease expires and takes the job over from the
            # keeper: the same attempt runs on, once.
            again = wait_for(lambda: (r := db.job(job_id))["worker_id"] != row["worker_id"] and r,
                             timeout=10, message="adopted")
            assert again["attempt"] == 1 and group_members(row["pid"])
        else:
            # Without a keeper the job was the stalled daemon's child: its group is killed, and the job runs again
            # as attempt 2.
            again = wait_for(lambda: (r := db.job(job_id))["attempt"] == 2 and r["status"] == "executing" and r,
                             timeout=10, message="rescued")
            assert again["worker_id"] != row["worker_id"]
            wait_for(lambda: not group_members(row["pid"]), timeout=5, message="stalled job's group killed")
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    # The stalled daemon wakes, finds its lease gone and stops loudly without touching the row (or the job).
    assert stalled.proc.wait(15) == 1
    assert stalled.events("lease.lost")
    now = db.job(job_id)
    assert (now["attempt"], now["status"], now["worker_id"]) == (again["attempt"], "executing", again["worker_id"])
    assert rescuer.proc is not None and rescuer.proc.poll() is None
    if keeper:
        assert group_members(row["pid"])


def test_retries_back_off_until_max_attempts(db: Db, daemon_factory: Callable[..., Daemon],
                                             tmp_path: Path) -> None:
    daemon_factory(config="[daemon]\nretry_backoff_ms = 200\n").start()
    ledger = tmp_path / "runs"
    job_id = db.insert(f"date +%s%N >> {ledger}; echo attempt; exit 3", max_attempts=4)
    row = wait_for(lambda: (r := db.job(job_id))["status"] == "failed" and r["duration"] is not None and r,
                   timeout=20, message="all attempts")
    assert (row["attempt"], row["exit_code"], row["stdout"]) == (4, 3, "attempt\n")  # the last attempt's output
    starts = [int(line) / 1e9 for line in ledger.read_text().split()]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 4
    # The n-th retry waits between half and all of 200 ms * 2^(n-1).
    for n, gap in enumerate(gaps, start=1):
        assert 0.2 * 2 ** (n - 1) * 0.5 <= gap, gaps


def test_a_job_that_succeeds_on_a_retry_completes(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    marker = tmp_path / "second-time"
    job_id = db.insert(f"if [ -e {marker} ]; then echo ok; else touch {marker}; exit 1; fi", max_attempts=3)
    row = db.wait_status(job_id, ("completed",), timeout=15)
    assert (row["attempt"], row["stdout"], row["error"]) == (2, "ok\n", None)


def test_run_after_holds(daemon: Daemon, db: Db) -> None:
    due = now_ms() + 800
    job_id = db.insert("true", run_after=due)
    row = db.wait_status(job_id, timeout=15)
    assert row["status"] == "completed"
    assert row["started_at"] >= due


def test_depends_on_waits_for_completion_and_fails_when_it_cannot(db: Db, daemon_factory: Callable[..., Daemon],
                                                                  tmp_path: Path) -> None:
    # A safety poll and node heartbeats this slow: what a job's end unblocks (or dooms) must be seen at that end,
    # not at the next poll or heartbeat (either makes the daemon look at the queue again).
    daemon_factory(config="[daemon]\npoll_interval_ms = 60000\nheartbeat_interval_ms = 60000\n").start()
    gate = tmp_path / "gate"
    first = db.insert(f"while [ ! -e {gate} ]; do sleep 0.02; done")
    second = db.insert("echo after", depends_on=first)
    doomed = db.insert(f"while [ ! -e {gate} ]; do sleep 0.02; done; exit 1")
    blocked = db.insert("echo never", depends_on=doomed)
    chained = db.insert("echo never", depends_on=blocked)
    orphan = db.insert("echo never", depends_on="no-such-job")
    withdrawn = db.insert("true", run_after=now_ms() + 3_600_000)
    on_withdrawn = db.insert("echo never", depends_on=withdrawn)
    db.wait_status(first, ("executing",))
    db.wait_status(doomed, ("executing",))
    assert db.job(second)["status"] == "queued"
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?", (now_ms(), withdrawn))
    gate.touch()
    row = db.wait_status(second)
    assert row["status"] == "completed" and row["started_at"] >= db.job(first)["completed_at"]
    row = db.wait_status(blocked)
    assert (row["status"], row["error"]) == (
        "failed", f"depends_on '{doomed}' ended failed; this job runs only after that job completed")
    assert db.wait_status(chained)["status"] == "failed"
    assert "is no job" in db.wait_status(orphan)["error"]
    row = db.wait_status(on_withdrawn)
    assert (row["status"], row["error"]) == (
        "failed", f"depends_on '{withdrawn}' ended cancelled; this job runs only after that job completed")


def test_shutdown_requeues_a_job_that_may_try_again(draining_daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo working; sleep 1000", max_attempts=2)
    wait_for(lambda: db.job(job_id)["stdout"] == "working\n", message="running")
    draining_daemon.stop_now()
    row = db.job(job_id)
    assert (row["status"], row["attempt"], row["error"]) == (
        "queued", 1, "daemon shut down while the job was running")
    assert row["stdout"] == "working\n"


def test_sigterm_drains_five_jobs_and_a_second_one_stops_them(draining_daemon: Daemon, db: Db,
                                                            tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    quick = [db.insert(f"while [ ! -e {gate} ]; do sleep 0.02; done; echo done") for _ in range(5)]
    for job_id in quick:
        db.wait_status(job_id, ("executing",))
    assert draining_daemon.proc is not None
    draining_daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: draining_daemon.events("dispatch.draining"), message="draining")
    gate.touch()
    assert draining_daemon.proc.wait(15) == 0
    assert {db.job(j)["status"] for j in quick} == {"completed"}


def test_retry_command_runs_a_finished_job_again_without_its_old_output(daemon: Daemon, db: Db) -> None:
    job_id = db.insert("echo run-$RANDOM; exit 1")
    first = db.wait_status(job_id)
    assert (first["status"], first["attempt"]) == ("failed", 1)
    cli(db, "retry", job_id[:8])
    second = wait_for(lambda: (r := db.job(job_id))["attempt"] == 2 and r["duration"] is not None and r,
                      message="second attempt")
    assert first["stdout"].count("run-") == 1
    assert second["stdout"].count("run-") == 1  # the old attempt's output is not carried into the new one
    assert cli(db, "retry", "nope", check=False).returncode == 1


def test_daemons_serving_different_nodes_share_a_database(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory().start()  # serves localhost
    daemon_factory(config='[daemon]\nlocal_node = "phone"\n').start()
    here, there = db.insert("echo here"), db.insert("echo there", node_id="phone")
    nowhere = db.insert("echo nowhere", node_id="ghost")
    assert db.wait_status(here)["stdout"] == "here\n"
    row = db.wait_status(there)
    assert (row["status"], row["stdout"]) == ("completed", "there\n")  # not failed as unknown by localhost's
    assert "unknown node" in db.wait_status(nowhere)["error"]


@pytest.mark.backends("sqlite", "postgres")
def test_completed_at_is_when_the_job_ended_however_late_the_write_lands(daemon: Daemon, db: Db) -> None:
    """While the database cannot be written (another program holds its write lock; a full disk does the same), the
    job's end waits in memory; once written, its duration is the job's own, not the wait's."""
    job_id = db.insert("echo started; sleep 0.5")
    wait_for(lambda: db.job(job_id)["stdout"] == "started\n", message="the job to run")
    held = 3.0
    is_pg = db.target != str(db.path)
    db.conn.execute("BEGIN" if is_pg else "BEGIN IMMEDIATE")
    if is_pg:
        db.conn.execute("LOCK TABLE jobs IN EXCLUSIVE MODE")
    time.sleep(held)  # the job ends meanwhile; what is measured is the write that waits for this lock
    db.conn.execute("ROLLBACK")
    released = now_ms()
    row = db.wait_status(job_id)
    assert (row["status"], row["attempt"]) == ("completed", 1)
    assert 400 <= row["duration"] < 0.5 * 1000 + 1500, row["duration"]
    assert row["completed_at"] <= released - 1000 and row["duration"] == row["completed_at"] - row["started_at"]
