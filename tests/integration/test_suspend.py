"""A phone's sleep, as the processes see it: the daemon, its keeper and a running job frozen together (SIGSTOP) for
three times the lease and more heartbeat intervals than a node may miss, then resumed (SIGCONT). Everything goes
on: the job completes with all its output and ran once, no lease is lost, no node goes offline, nothing is
re-queued; an SSH job whose link died meanwhile is followed again once the node answers."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tests.conftest import Daemon, Db, keeper_pids, wait_for
from tests.integration.conftest import Sshd
from tests.integration.test_reattach import QUICK, GatedJob

LEASE_MS = 1000
HEARTBEAT_MS = 300
FREEZE_S = 3 * LEASE_MS / 1000  # 3 leases, 10 heartbeat intervals
CONFIG = (f"[daemon]\nlease_ttl_ms = {LEASE_MS}\nheartbeat_interval_ms = {HEARTBEAT_MS}\nflush_interval_ms = 100\n"
          "[nodes.localhost]\noffline_after = 3\n")
LINES = 30
EXPECTED = "".join(f"line {i}\n" for i in range(1, LINES + 1))


@contextlib.contextmanager
def frozen(pids: Sequence[int], groups: Sequence[int] = ()) -> Iterator[None]:
    """The processes and process groups stopped as a suspend stops them, all at once, and resumed on the way out."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for group in groups:
        os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        for group in groups:
            os.killpg(group, signal.SIGCONT)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def _gap_left_no_trace(daemon: Daemon, db: Db) -> None:
    """What a daemon must not do for a gap alone: lose its lease, recover or re-queue, mark a node offline."""
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
    for event in ("lease.lost", "lease.recovering", "job.recovered", "job.requeued", "node.unserved"):
        assert not daemon.events(event), (event, daemon.events(event))
    assert [e for e in daemon.events("node.status") if e["status"] != "online"] == []
    statuses = dict(db.conn.execute("SELECT id, status FROM nodes").fetchall())
    assert set(statuses.values()) == {"online"}, statuses


def test_a_job_frozen_with_its_daemon_and_keeper_for_three_leases_completes_once_with_all_its_output(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_factory(CONFIG).start()
    runs = tmp_path / "runs"
    job_id = db.insert(f'echo run >> "{runs}"; for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.05; done')
    row = wait_for(lambda: (r := db.job(job_id))["pid"] and "line 3\n" in (r["stdout"] or "") and r,
                   message="the job running, its output flowing")
    keepers = keeper_pids(db.path)
    assert daemon.proc is not None and len(keepers) == 1
    with frozen([daemon.proc.pid, *keepers], [int(row["pid"])]):
        time.sleep(FREEZE_S)  # the suspend itself, not a wait for something
        queued_meanwhile = db.insert("echo after")
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["exit_code"], row["error"], row["attempt"]) == ("completed", 0, None, 1)
    assert (row["stdout"], row["stdout_bytes"]) == (EXPECTED, len(EXPECTED))
    assert runs.read_text() == "run\n"
    assert db.wait_status(queued_meanwhile)["stdout"] == "after\n"
    wait_for(lambda: db.conn.execute("SELECT count(*) FROM jobd_workers WHERE stopped_at IS NULL AND "
                                     "heartbeat_at > ?", (row["completed_at"],)).fetchone()[0] == 1,
             message="the lease renewed after the gap")
    _gap_left_no_trace(daemon, db)


def test_an_ssh_job_whose_link_died_during_the_freeze_is_followed_again_and_completes_once(
        sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon]) -> None:
    server, link = sshd_behind_a_link
    config = CONFIG.replace(f"heartbeat_interval_ms = {HEARTBEAT_MS}", "heartbeat_interval_ms = 1000")
    daemon = daemon_factory(config + server.node_config(node="far", **QUICK)).start()
    wait_for(lambda: daemon.events("node.status"), timeout=20, message="the node's first probe")
    job = GatedJob(server)
    job_id = db.insert(job.command, node_id="far")
    wait_for(lambda: db.job(job_id)["stdout"] == "start\n", timeout=30, message="running remotely")
    assert daemon.proc is not None
    with frozen([daemon.proc.pid, *keeper_pids(db.path)]):
        # The phone's network goes while it sleeps, and the node gives the connection up (as a NAT or the node's
        # own timeout would): when the phone wakes, its connection is dead. The job runs on, and ends, there.
        link(False)
        for pid in server.sshd_processes():
            os.kill(pid, signal.SIGKILL)
        job.go()
        time.sleep(FREEZE_S)  # the suspend itself: 3 leases, 3 heartbeat intervals
        link(True)
    job.check(db.wait_status(job_id, timeout=60))
    assert daemon.events("ssh.link_lost") and daemon.events("ssh.link_back")
    assert db.job(job_id)["attempt"] == 1
    _gap_left_no_trace(daemon, db)
