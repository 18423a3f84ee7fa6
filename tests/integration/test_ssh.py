"""Jobs on an SSH node: a real OpenSSH sshd on loopback, the real daemon, real remote processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import NEXUS_JOBD, Daemon, Db, wait_for
from tests.integration.conftest import Sshd

FAST = "[daemon]\nheartbeat_interval_ms = 200\nkill_grace_ms = 500\n"


def _node(db: Db, node: str = "box") -> dict[str, object]:
    row = db.conn.execute("SELECT * FROM nodes WHERE id = ?", (node,)).fetchone()
    return dict(row) if row else {}


def test_a_job_on_an_ssh_node_streams_both_outputs_and_records_the_exit_code(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    job_id = db.insert("echo out; echo err >&2; echo $GREETING in $(pwd); exit 3", node_id="box",
                       env={"GREETING": "hi there"}, cwd="/tmp")
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", 3)
    assert (row["stdout"], row["stderr"]) == ("out\nhi there in /tmp\n", "err\n")
    git = db.wait_status(db.insert("git --version", tool="git", node_id="box"), timeout=30)
    assert (git["status"], git["stdout"].split()[:2]) == ("completed", ["git", "version"])
    quoted = db.wait_status(db.insert("rev-parse --sq-quote 'a;b $HOME' \"c d\"", tool="git", node_id="box"))
    assert quoted["stdout"].strip() == "'a;b $HOME' 'c d'"  # the remote shell passed the arguments untouched
    node = wait_for(lambda: (n := _node(db)).get("status") == "online" and n, message="node online")
    caps = json.loads(str(node["capabilities"]))
    assert caps["tools"]["bash"].startswith("GNU bash") and caps["os"] == "Linux" and caps["cpus"] >= 1
    assert caps["rtt_ms"] > 0 and isinstance(caps["load"], list) and caps["mem_total_kb"] > 0


def test_200_jobs_run_over_one_connection(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    before = sshd.accepted()
    daemon_factory(config=FAST + sshd.node_config(max_concurrent=16)).start()
    db.conn.execute("BEGIN")
    jobs = [db.insert(f"echo {i}", node_id="box") for i in range(200)]
    db.conn.execute("COMMIT")
    for i, job_id in enumerate(jobs):
        assert db.wait_status(job_id, timeout=60)["stdout"] == f"{i}\n"
    assert sshd.accepted() - before == 1


def test_an_unknown_host_key_is_refused(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon],
                                        tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    other = (sshd.root / "client_key.pub").read_text().split()  # some other key than the host's
    wrong.write_text(f"[127.0.0.1]:{sshd.port} {other[0]} {other[1]}\n")
    config = FAST + sshd.node_config().replace(str(sshd.known_hosts), str(wrong))
    daemon_factory(config=config).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "error" and n, timeout=20, message="node error")
    assert "host key" in json.loads(str(node["capabilities"]))["error"]
    row = db.wait_status(db.insert("echo never", node_id="box"), timeout=20)
    assert row["status"] == "failed" and "node box is in error" in row["error"] and "host key" in row["error"]


def test_a_node_goes_offline_after_missed_probes_and_its_jobs_wait(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config(offline_after=3, keepalive_interval_ms=300)).start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=20, message="online")
    sshd.stop()
    try:
        node = wait_for(lambda: (n := _node(db)).get("status") == "offline" and n, timeout=20, message="offline")
        assert json.loads(str(node["capabilities"]))["missed_probes"] >= 3  # one missed probe is not enough
        job_id = db.insert("echo back", node_id="box")
        assert db.wait_status(job_id, ("queued",))["status"] == "queued"
    finally:
        sshd.start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=30, message="online again")
    assert db.wait_status(job_id, timeout=30)["stdout"] == "back\n"


def test_cancel_and_timeout_leave_no_remote_process(sshd: Sshd, db: Db,
                                                    daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config()).start()
    cancelled = db.insert("echo up; sleep 1001 & sleep 1002; wait", node_id="box")
    wait_for(lambda: db.job(cancelled)["stdout"] == "up\n", timeout=30, message="running remotely")
    assert sshd.remote_pgrep("sleep 100[12]")
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = 1 WHERE id = ?", (cancelled,))
    wait_for(lambda: not sshd.remote_pgrep("sleep 100[12]"), timeout=10, message="remote group killed")
    row = wait_for(lambda: (r := db.job(cancelled))["duration"] is not None and r, timeout=20, message="recorded")
    assert row["status"] == "cancelled"

    timed = db.insert("trap '' TERM; sleep 1003 & sleep 1004; wait", node_id="box", timeout_ms=1000)
    row = db.wait_status(timed, timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", 124)
    wait_for(lambda: not sshd.remote_pgrep("sleep 100[34]"), timeout=10, message="remote group killed")


def test_a_dropped_connection_fails_the_job_with_connection_lost(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config=FAST + sshd.node_config(keepalive_interval_ms=300, keepalive_count_max=3)).start()
    job_id = db.insert("echo up; sleep 1005", node_id="box")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running remotely")
    # Freeze the sshd processes serving the connection: no keepalive answer, as on a cut link.
    session_sshd = sshd.sshd_processes()
    assert session_sshd
    for pid in session_sshd:
        os.kill(pid, signal.SIGSTOP)
    try:
        row = db.wait_status(job_id, timeout=20)
        assert (row["status"], row["error"]) == ("failed", "connection to node box lost while the job ran")
    finally:
        for pid in session_sshd:
            os.kill(pid, signal.SIGCONT)



def test_cutting_the_link_mid_job_fails_it_with_connection_lost_within_seconds(
        sshd_behind_a_link: tuple[Sshd, Callable[[bool], None]], db: Db,
        daemon_factory: Callable[..., Daemon]) -> None:
    server, link = sshd_behind_a_link
    config = FAST + server.node_config(node="far", keepalive_interval_ms=1000, keepalive_count_max=3)
    daemon_factory(config=config).start()
    job_id = db.insert("echo up; sleep 1006", node_id="far")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running behind the link")
    cut_at = time.monotonic()
    link(False)
    row = db.wait_status(job_id, timeout=20)
    assert (row["status"], row["error"]) == ("failed", "connection to node far lost while the job ran")
    print(f"link cut to job failed: {time.monotonic() - cut_at:.1f}s")
    # The job may still run over there: once the link is back, the daemon kills it.
    assert server.remote_pgrep("sleep 1006")
    link(True)
    wait_for(lambda: not server.remote_pgrep("sleep 1006"), timeout=30, message="remote orphan killed")


def test_nodes_command_and_a_removed_node_going_offline(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon],
                                                        tmp_path: Path) -> None:
    db.conn.execute("INSERT INTO nodes (id, hostname, status, created_at) VALUES ('retired', 'old-box', 'online', 1)")
    daemon = daemon_factory(config=FAST + sshd.node_config())
    daemon.start()
    wait_for(lambda: _node(db).get("status") == "online", timeout=20, message="online")
    assert wait_for(lambda: _node(db, "retired").get("status") == "offline", message="retired node offline")
    db.insert("sleep 30", node_id="box")
    cli = [*NEXUS_JOBD, "--db", str(db.path), "--config", str(daemon.config_path)]
    listing = wait_for(lambda: (rows := {r["id"]: r for r in json.loads(subprocess.run(
        [*cli, "nodes", "--json"], capture_output=True, text=True, check=True).stdout)})["box"]["running"] == 1
        and rows, message="nodes --json")
    assert listing["box"]["status"] == "online" and "bash" in listing["box"]["capabilities"]["tools"]
    assert listing["localhost"]["status"] == "online" and listing["box"]["heartbeat_age_s"] < 5
    table = subprocess.run([*cli, "nodes"], capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[0].split()[:3] == ["NODE", "STATUS", "HEARTBEAT"]
    check = subprocess.run([*cli, "nodes", "check", "box"], capture_output=True, text=True)
    assert check.returncode == 0 and json.loads(check.stdout)["capabilities"]["os"] == "Linux"
    bad = tmp_path / "bad.toml"
    bad.write_text(sshd.node_config().replace(f"port = {sshd.port}", "port = 1"))  # nothing listens there
    refused = subprocess.run([*NEXUS_JOBD, "--config", str(bad), "nodes", "check", "box"], capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "node box is not usable" in refused.stderr


def test_kill_9_then_restart_kills_the_remote_job_too(sshd: Sshd, db: Db,
                                                     daemon_factory: Callable[..., Daemon]) -> None:
    first = daemon_factory(config=FAST + sshd.node_config()).start()
    job_id = db.insert("echo up; sleep 1007", node_id="box")
    wait_for(lambda: db.job(job_id)["stdout"] == "up\n", timeout=30, message="running remotely")
    assert first.proc is not None
    first.proc.kill()
    first.proc.wait()
    assert sshd.remote_pgrep("sleep 1007")  # the daemon's death alone does not end a remote job
    daemon_factory(config=FAST + sshd.node_config()).start()
    row = db.wait_status(job_id, ("failed",), timeout=20)
    assert row["error"] == "daemon stopped while the job was running"
    wait_for(lambda: not sshd.remote_pgrep("sleep 1007"), timeout=10, message="remote orphan killed")


def test_node_limits_hold_on_an_ssh_node_from_the_jobs_first_instruction(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    limits = "[nodes.box.limits]\ncpu_seconds = 1\nfile_size_bytes = 4096\nopen_files = 64\n"
    daemon_factory(config=FAST + sshd.node_config() + limits).start()
    # Reads the limits from the job's own process: the bytes configured, whatever shell set them.
    seen = db.wait_status(db.insert("cat /proc/self/limits", node_id="box"), timeout=30)
    rows = {line[:26].strip(): line[26:].split()[:2] for line in seen["stdout"].splitlines()[1:]}
    assert (rows["Max cpu time"], rows["Max file size"], rows["Max open files"]) == (["1", "2"], ["4096"] * 2,
                                                                                    ["64"] * 2)
    spinner = db.wait_status(db.insert("while :; do :; done", node_id="box"), timeout=30)
    assert (spinner["status"], spinner["exit_code"]) == ("failed", 128 + 24)  # SIGXCPU after 1 s of CPU
    writer = db.wait_status(db.insert("head -c 100000 /dev/zero > /tmp/nexus-jobd-limit-$$; echo $?; "
                                      "stat -c %s /tmp/nexus-jobd-limit-$$; rm /tmp/nexus-jobd-limit-$$",
                                      node_id="box"), timeout=30)
    assert writer["stdout"] == f"{128 + 25}\n4096\n"  # SIGXFSZ: the file may not grow past 4096 bytes


def test_an_ssh_node_that_refuses_its_limits_is_in_error_and_its_jobs_fail_with_the_reason(
        sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    limits = "[nodes.box.limits]\nopen_files = 1000000000000\n"  # above any hard limit, for a user that is not root
    daemon_factory(config=FAST + sshd.node_config() + limits).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "error" and n, timeout=20, message="node error")
    assert "refuses its [nodes.box.limits]" in json.loads(str(node["capabilities"]))["error"]
    row = db.wait_status(db.insert("echo never", node_id="box"), timeout=20)
    assert (row["status"], row["stdout"]) == ("failed", None)
    assert "refuses its [nodes.box.limits]" in row["error"] and "ulimit -Ha" in row["error"]
    assert "open_files = 1000000000000" in row["error"]  # which key
