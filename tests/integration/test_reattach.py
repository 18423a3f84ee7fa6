"""Remote jobs outlive the link and the daemon: a real sshd (on loopback, or behind a veth link the test cuts), the
real daemon killed and restarted, real remote processes counted on the node."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from daemon.executors import spool
from tests.conftest import Daemon, Db, wait_for
from tests.integration.conftest import Sshd

FAST = "[daemon]\nheartbeat_interval_ms = 200\nkill_grace_ms = 500\nflush_interval_ms = 100\n"
# Keepalive finds a dead link within about a second; a reconnect gives up on a silent host after 2 s.
QUICK = {"keepalive_interval_ms": 300, "keepalive_count_max": 3, "connect_timeout_ms": 2000}
SEQ = 3000
EXPECTED_OUT = "start\n" + "".join(f"{i}\n" for i in range(1, SEQ + 1))


class GatedJob:
    """A job that counts its runs in a file on the node, prints a line, waits for the test's go, then prints
    SEQ lines and a line on stderr and exits 5: exact output and "ran once" are both checkable."""

    def __init__(self, server: Sshd) -> None:
        self.server, self.tag = server, uuid.uuid4().hex[:8]
        self.runs, self.go_file = server.home / f"runs-{self.tag}", server.home / f"go-{self.tag}"
        self.command = (f"echo once >> $HOME/runs-{self.tag}; echo start; "
                        f"while [ ! -e $HOME/go-{self.tag} ]; do sleep 0.05; done; seq 1 {SEQ}; echo err >&2; exit 5")

    def go(self) -> None:
        self.go_file.touch()

    def check(self, row: dict[str, object]) -> None:
        assert (row["status"], row["exit_code"], row["error"]) == ("failed", 5, None), row["error"]
        assert row["stdout"] == EXPECTED_OUT and row["stderr"] == "err\n"
        assert (row["stdout_bytes"], row["stderr_bytes"]) == (len(EXPECTED_OUT), 4)
        assert self.runs.read_text() == "once\n"  # it ran once, whatever happened to the link and the daemon


def _job_dir(server: Sshd, job_id: str, attempt: int = 1) -> Path:
    return server.home / ".cache" / "nexus-jobd" / "jobs" / spool.dir_name(f"{job_id}:{attempt}")


def _started(db: Db, job_id: str) -> None:
    wait_for(lambda: db.job(job_id)["stdout"] == "start\n", timeout=30, message="running remotely")


def test_a_link_cut_for_longer_than_the_keepalive_does_not_fail_the_job(
        sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon]) -> None:
    server, link = sshd_behind_a_link
    daemon = daemon_factory(config=FAST + server.node_config(node="far", **QUICK)).start()
    job = GatedJob(server)
    job_id = db.insert(job.command, node_id="far")
    _started(db, job_id)
    link(False)
    try:
        wait_for(lambda: daemon.events("ssh.link_lost"), timeout=20, message="the daemon noticing the cut")
        time.sleep(2)  # down for longer than the keepalive (0.9 s) and a reconnect attempt: still executing
        assert db.job(job_id)["status"] == "executing"
        job.go()  # the job goes on and ends while the link is down
        wait_for(lambda: (_job_dir(server, job_id) / "rc").exists(), timeout=20, message="the job's end on the node")
    finally:
        link(True)
    row = db.wait_status(job_id, timeout=60)
    job.check(row)
    assert daemon.events("ssh.link_back") and not daemon.events("job.reattached")


def test_killing_the_sshd_processes_of_the_connection_does_not_fail_the_job(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(config=FAST + sshd.node_config(**QUICK)).start()
    job = GatedJob(sshd)
    job_id = db.insert(job.command, node_id="box")
    _started(db, job_id)
    serving = sshd.sshd_processes()
    assert serving
    for pid in serving:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.events("ssh.link_back"), timeout=30, message="reconnected and reading again")
    job.go()
    job.check(db.wait_status(job_id, timeout=60))


def test_kill_9_of_the_daemon_then_a_restart_reattaches_exactly(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    config = FAST + sshd.node_config()
    first = daemon_factory(config=config).start()
    job = GatedJob(sshd)
    job_id = db.insert(job.command, node_id="box")
    _started(db, job_id)
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    second = daemon_factory(config=config).start()
    adopted = wait_for(lambda: second.events("job.reattached"), timeout=20, message="job.reattached")
    assert adopted[0]["job_id"] == job_id and adopted[0]["stdout_bytes"] == len("start\n")
    job.go()
    row = db.wait_status(job_id, timeout=60)
    job.check(row)
    assert row["worker_id"] != first.events("dispatch.started")[0]["worker_id"]
    wait_for(lambda: not _job_dir(sshd, job_id).exists(), timeout=20, message="the spool removed")


def test_a_restart_past_the_output_cap_goes_on_from_the_rows_byte_count(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    """The row is past the cap when the daemon dies: the next one goes on from its head, tail and byte count, and
    the final row is the README's head and tail of every byte the job wrote, worked out here by hand."""
    cap = 1024
    config = FAST + f"output_cap_bytes = {cap}\n" + sshd.node_config()
    first = daemon_factory(config=config).start()
    go = sshd.home / f"go-{uuid.uuid4().hex[:8]}"
    job_id = db.insert(f"seq 1 400; while [ ! -e {go} ]; do sleep 0.05; done; seq 401 450", node_id="box")
    before = "".join(f"{i}\n" for i in range(1, 401))  # 1492 bytes: past the cap already
    wait_for(lambda: db.job(job_id)["stdout_bytes"] == len(before), timeout=30, message="the first part flushed")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    second = daemon_factory(config=config).start()
    adopted = wait_for(lambda: second.events("job.reattached"), timeout=20, message="job.reattached")
    assert adopted[0]["stdout_bytes"] == len(before)
    go.touch()
    row = db.wait_status(job_id, timeout=60)
    written = before + "".join(f"{i}\n" for i in range(401, 451))  # 1692 bytes, one byte a character: the tail
    # (the last 768) begins before the seam, so a byte lost or doubled there shows in the row
    total = len(written)
    assert (row["status"], row["exit_code"], row["attempt"], row["stdout_bytes"]) == ("completed", 0, 1, total)
    assert row["stdout"] == (written[:cap // 4] + f"\n[nexus-jobd: {total - cap} bytes of stdout omitted; {total} "
                             "bytes in all]\n" + written[-(cap - cap // 4):])


def test_a_job_that_ends_while_no_daemon_runs_is_collected(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    config = FAST + sshd.node_config()
    first = daemon_factory(config=config).start()
    job = GatedJob(sshd)
    job_id = db.insert(job.command, node_id="box")
    _started(db, job_id)
    assert first.proc is not None
    stopping = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)  # on_stop = "detach", the default
    assert first.proc.wait(10) == 0
    print(f"SIGTERM to exit with a remote job running: {time.monotonic() - stopping:.1f}s")
    assert first.events("dispatch.detached")[0]["jobs"] == 1
    assert db.job(job_id)["status"] == "executing"  # left for the next daemon
    job.go()
    wait_for(lambda: (_job_dir(sshd, job_id) / "rc").exists(), timeout=20, message="the job's end on the node")
    daemon_factory(config=config).start()
    job.check(db.wait_status(job_id, timeout=30))


def test_on_stop_drain_still_waits_for_a_remote_job(sshd: Sshd, db: Db,
                                                  daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(config=FAST + 'on_stop = "drain"\n' + sshd.node_config()).start()
    job = GatedJob(sshd)
    job_id = db.insert(job.command, node_id="box")
    _started(db, job_id)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.events("dispatch.draining"), message="draining")
    job.go()
    assert daemon.proc.wait(30) == 0
    job.check(db.wait_status(job_id))


def test_cancel_while_the_link_is_down_kills_the_remote_group_once_it_is_back(
        sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon]) -> None:
    server, link = sshd_behind_a_link
    daemon = daemon_factory(config=FAST + server.node_config(node="far", **QUICK)).start()
    job_id = db.insert("echo up; sleep 1011 & sleep 1012; wait", node_id="far")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running behind the link")
    link(False)
    try:
        wait_for(lambda: daemon.events("ssh.link_lost"), timeout=20, message="the daemon noticing the cut")
        db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?",
                        (int(time.time() * 1000), job_id))
        wait_for(lambda: daemon.events("ssh.signal_failed"), timeout=20, message="a kill that cannot get through")
        assert server.remote_pgrep("sleep 101[12]")
    finally:
        link(True)
    wait_for(lambda: not server.remote_pgrep("sleep 101[12]"), timeout=60, message="remote group killed")
    row = wait_for(lambda: (r := db.job(job_id))["duration"] is not None and r, timeout=30, message="recorded")
    assert (row["status"], row["stdout"], row["exit_code"]) == ("cancelled", "up\n", 128 + signal.SIGKILL)


def test_a_node_unreachable_past_reattach_timeout_fails_the_job_and_kills_it_when_back(
        sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon]) -> None:
    server, link = sshd_behind_a_link
    config = FAST + server.node_config(node="far", reattach_timeout_ms=2000, **QUICK)
    daemon_factory(config=config).start()
    job_id = db.insert("echo up; sleep 1013", node_id="far")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running behind the link")
    cut_at = time.monotonic()
    link(False)
    try:
        row = db.wait_status(job_id, timeout=30)
        print(f"link cut to job failed: {time.monotonic() - cut_at:.1f}s")
        assert (row["status"], row["exit_code"], row["stdout"]) == ("failed", None, "up\n")
        assert row["error"] == ("connection to node far lost while the job ran, and not back within "
                                "reattach_timeout_ms (2000)")
        assert server.remote_pgrep("sleep 1013")  # the node ran on by itself
    finally:
        link(True)
    wait_for(lambda: not server.remote_pgrep("sleep 1013"), timeout=60, message="remote orphan killed")
    wait_for(lambda: not _job_dir(server, job_id).exists(), timeout=10, message="its spool removed")


def test_a_1_gb_output_bomb_leaves_a_spool_near_the_output_cap(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    cap = 1024 * 1024
    daemon_factory(config=FAST + f"output_cap_bytes = {cap}\n" + sshd.node_config()).start()
    job_id = db.insert("head -c 1073741824 /dev/zero | tr '\\0' x; echo; echo done", node_id="box")
    out = _job_dir(sshd, job_id) / "out"
    samples = []
    deadline = time.monotonic() + 120
    while (row := db.job(job_id))["duration"] is None:
        assert time.monotonic() < deadline, "the 1 GB job not recorded within 120 s"
        with contextlib.suppress(FileNotFoundError):
            samples.append(out.stat().st_blocks * 512)  # what the spool takes on disk (holes take nothing)
        time.sleep(0.005)
    left = out.stat().st_blocks * 512  # the directory stays a while after the row is final
    ordered = sorted(samples)
    median, worst = ordered[len(ordered) // 2], ordered[-1]
    print(f"spool on disk over {len(samples)} samples: median {median / 2**20:.1f} MiB, max {worst / 2**20:.1f} MiB, "
          f"{left / 2**20:.1f} MiB at the end")
    total = 2**30 + len("\ndone\n")
    assert (row["status"], row["stdout_bytes"]) == ("completed", total)
    assert row["stdout"] == ("x" * (cap // 4) + f"\n[nexus-jobd: {total - cap} bytes of stdout omitted; {total} bytes "
                             "in all]\n" + "x" * (cap - cap // 4 - 6) + "\ndone\n")
    # The writer (hundreds of MB/s) is far faster than a reader: the spool holds the cap plus what it writes
    # between two punches of the node's trimmer (medians of 11-31 MiB measured), more while the box is busy.
    # Its peaks, mostly before the first read starts the trimmer, measured 80-315 MiB on a busy 2-core box: no
    # bound on them would both hold and mean anything (the trimmer's own bound is tested in test_ssh_scripts,
    # where no reader competes). The last read punched out the middle: head, tail and less than one punch step.
    assert len(samples) > 10 and median < 32 * cap
    assert left <= 3 * cap


def test_a_spool_left_by_a_final_row_is_swept_by_the_next_daemon(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    jobs_dir = sshd.home / ".cache" / "nexus-jobd" / "jobs"
    jobs_dir.mkdir(parents=True, exist_ok=True)
    # A job of this database that runs on the node while the sweep comes (10 s after start): it must stay. And a
    # directory of another installation that logs in as the same user (not in this database): it must stay too.
    running, foreign = "running-job", jobs_dir / spool.dir_name("another-installations-job:1")
    foreign.mkdir()
    # A final row of this database whose daemon could not remove its spool, named to come last in the sweep's
    # order (`ls`): once it is gone, the sweep has been past the other two.
    gone = next(f"gone-job-{i}" for i in itertools.count()
                if spool.dir_name(f"gone-job-{i}:1") > max(foreign.name, spool.dir_name(f"{running}:1")))
    db.insert("true", id=gone, node_id="box", attempt=1)
    db.conn.execute("UPDATE jobs SET status = 'failed', duration = 5, completed_at = 1 WHERE id = ?", (gone,))
    leftover = jobs_dir / spool.dir_name(f"{gone}:1")
    leftover.mkdir()
    subprocess.run(["chown", "-R", f"{sshd.user}:", str(sshd.home / ".cache")], check=True)
    daemon = daemon_factory(config=FAST + sshd.node_config())
    daemon.start()
    job = GatedJob(sshd)
    db.insert(job.command, id=running, node_id="box")
    _started(db, running)
    wait_for(lambda: not leftover.exists(), timeout=30, message="the leftover swept")
    assert foreign.exists() and _job_dir(sshd, running).exists()
    # The event is logged once the node's kill script returns, a moment after the directory is gone.
    swept = wait_for(lambda: daemon.events("ssh.spool_swept"), timeout=30, message="ssh.spool_swept")
    assert [e["dir"] for e in swept] == [leftover.name]
    job.go()
    job.check(db.wait_status(running, timeout=30))


def test_a_status_file_that_does_not_parse_fails_the_job_with_the_reason_and_kills_it(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    job_id = db.insert("echo up; sleep 1015", node_id="box")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running remotely")
    (_job_dir(sshd, job_id) / "rc").write_text("not a number\n")  # a hostile (or broken) node
    row = db.wait_status(job_id, timeout=20)
    assert (row["status"], row["exit_code"], row["stdout"]) == ("failed", None, "up\n")
    assert row["error"] == "the job's status file on node box holds 'not a number', not an exit status"
    wait_for(lambda: not sshd.remote_pgrep("sleep 1015"), timeout=20, message="the job killed")


def test_a_reattached_jobs_timeout_counts_from_its_start_and_kills_the_remote_group(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    config = FAST + sshd.node_config()
    first = daemon_factory(config=config).start()
    job_id = db.insert("echo up; sleep 1016", node_id="box", timeout_ms=4000)
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running remotely")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    started_at = db.job(job_id)["started_at"]
    wait_for(lambda: time.time() * 1000 - started_at >= 2500, timeout=10, message="2.5 s into the job")
    second = daemon_factory(config=config).start()
    row = db.wait_status(job_id, timeout=30)
    assert second.events("job.reattached") and second.events("job.timed_out")
    assert (row["status"], row["exit_code"], row["stdout"], row["attempt"]) == ("failed", 124, "up\n", 1)
    # Counted from the row's started_at: 4 s and the kill grace, not 4 s after the restart (2.5 s later).
    assert 4000 <= row["duration"] < 6400, row["duration"]
    wait_for(lambda: not sshd.remote_pgrep("sleep 1016"), timeout=20, message="the remote group killed")
