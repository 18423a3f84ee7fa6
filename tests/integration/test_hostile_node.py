"""A hostile (or broken) SSH node: a real sshd whose ForceCommand answers the daemon's probe or a job's start with
what the test puts there. Whatever the node sends fails that job, or misses that probe, with a reason: it never
crashes, wedges or bloats the daemon."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon.executors import spool
from tests.conftest import Daemon, Db, require, wait_for
from tests.integration.conftest import Sshd

FAST = "[daemon]\nheartbeat_interval_ms = 200\nkill_grace_ms = 500\noutput_cap_bytes = 1024\n"
# The node's shell answers the daemon's probe with probe.sh, a job's start with start.sh and the sweep's listing
# with ls.sh, when the test wrote them; every other command of the daemon's (a kill, a reader) runs as on an
# honest node.
FORCE_COMMAND = """case $SSH_ORIGINAL_COMMAND in
  *'echo "os=$(uname -s)"'*) f={root}/probe.sh;;
  *'umask 077; J='*) f={root}/start.sh;;
  *'/jobs" 2>/dev/null && ls'*) f={root}/ls.sh;;
  *) f=;;
esac
if [ -n "$f" ] && [ -f "$f" ]; then exec /bin/sh "$f"; fi
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""
# A start that skips the variables and answers the first request with a complete head (cap + 1 bytes), then
# FRAMES, then "still running" to each request.
ANSWER_FIRST_REQUEST = """while IFS= read -r line; do case $line in *[!0-9\\ ]*) ;; *[0-9]\\ [0-9]*) break;; esac; done
printf 'D1 1025\\n'; head -c 1025 /dev/zero | tr '\\0' x
{frames}
echo 'Z run'
while read -r line; do echo 'Z run'; done
"""


class HostileNode:
    def __init__(self, server: Sshd) -> None:
        self.server = server

    def on_probe(self, script: str) -> None:
        (self.server.root / "probe.sh").write_text(script)

    def on_start(self, script: str) -> None:
        (self.server.root / "start.sh").write_text(script)

    def on_sweep(self, script: str) -> None:
        (self.server.root / "ls.sh").write_text(script)


@pytest.fixture
def hostile() -> Iterator[HostileNode]:
    require(shutil.which("/usr/sbin/sshd") is not None, "OpenSSH server not installed (Debian: openssh-server)")
    root = Path(tempfile.mkdtemp(prefix="njd-sshd-hostile-"))
    force = root / "force.sh"
    force.write_text(FORCE_COMMAND.format(root=root))
    force.chmod(0o755)
    server: Sshd | None = None
    try:
        server = Sshd(root, extra_config=f"ForceCommand /bin/sh {force}\n")
        yield HostileNode(server)
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(root, ignore_errors=True)


def _node(db: Db) -> dict[str, object]:
    row = db.conn.execute("SELECT * FROM nodes WHERE id = 'box'").fetchone()
    return dict(row) if row else {}


def _still_serves(daemon: Daemon, db: Db) -> None:
    """The daemon runs on, and runs jobs."""
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
    assert db.wait_status(db.insert("echo alive"), timeout=30)["stdout"] == "alive\n"
    assert "Traceback" not in daemon.log()


def _peak_rss_kb(daemon: Daemon) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_probe_that_does_not_parse_is_ignored_field_by_field_not_a_crash(
        hostile: HostileNode, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    hostile.on_probe("printf 'os=Linux\\nload=a b c\\ncpus=\\302\\262\\nmem_total_kb=1e5\\n"
                     "mem_available_kb=99999999999999999999999999999\\nbash=%s\\n' \"$(head -c 5000 /dev/zero "
                     "| tr '\\0' v)\"\n")
    daemon = daemon_factory(config=FAST + hostile.server.node_config()).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "online" and n, timeout=20, message="node online")
    caps = json.loads(str(node["capabilities"]))
    assert caps["os"] == "Linux"
    assert (caps["load"], caps["cpus"], caps["mem_total_kb"], caps["mem_available_kb"]) == (None, None, None, None)
    assert len(caps["tools"]["bash"]) <= 300  # a fact is a short text, however long the node says it
    _still_serves(daemon, db)


def test_a_probe_that_prints_without_end_is_a_missed_probe_read_only_so_far(
        hostile: HostileNode, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    hostile.on_probe("echo os=Linux; head -c 200000000 /dev/zero | tr '\\0' x\n")
    daemon = daemon_factory(config=FAST + hostile.server.node_config(offline_after=2)).start()
    node = wait_for(lambda: (n := _node(db)).get("status") == "offline" and n.get("capabilities") and n, timeout=30,
                    message="node offline")
    error = json.loads(str(node["capabilities"]))["error"]
    assert "node box printed more than 65536 bytes" in error, error
    peak = _peak_rss_kb(daemon)
    print(f"daemon peak RSS with a node printing 200 MB per probe: {peak / 1024:.0f} MiB")
    assert peak < 150 * 1024
    _still_serves(daemon, db)


SKIPS = {
    "a skip past 2^64": "printf 'K1 18446744073709551616\\n'",
    "skips that add up past 2^63": "i=0; while [ $i -lt 1100 ]; do printf 'K1 9007199254740991\\n'; i=$((i+1)); done",
    "a piece longer than any reader sends": "printf 'D2 99999999999999\\n'; head -c 5000 /dev/zero",
}


@pytest.mark.backends("sqlite", "postgres")
@pytest.mark.parametrize("frames", list(SKIPS))
def test_counts_past_what_a_spool_can_hold_fail_that_job_with_the_reason(
        hostile: HostileNode, db: Db, daemon_factory: Callable[..., Daemon], frames: str) -> None:
    hostile.on_start(ANSWER_FIRST_REQUEST.format(frames=SKIPS[frames]))
    daemon = daemon_factory(config=FAST + hostile.server.node_config()).start()
    row = db.wait_status(db.insert("echo never runs", node_id="box"), timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", None)
    assert row["error"].startswith("node box: the job's reader sent "), row["error"]
    assert "more than" in row["error"] or "past what a spool can hold" in row["error"], row["error"]
    assert row["stdout_bytes"] < 2**53
    _still_serves(daemon, db)


def test_answers_nobody_asked_for_fail_that_job_and_are_not_queued(
        hostile: HostileNode, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    hostile.on_start("yes 'Z run' | head -n 300000; sleep 30\n")
    daemon = daemon_factory(config=FAST + hostile.server.node_config()).start()
    row = db.wait_status(db.insert("echo never runs", node_id="box"), timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", None)
    assert "an answer nobody asked for" in row["error"], row["error"]
    _still_serves(daemon, db)


def test_a_sweep_listing_without_end_is_read_only_so_far_and_what_it_named_is_swept(
        hostile: HostileNode, db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    jobs_dir = hostile.server.home / ".cache" / "nexus-jobd" / "jobs"
    leftover = jobs_dir / spool.dir_name("gone-job:1")
    leftover.mkdir(parents=True)
    subprocess.run(["chown", "-R", f"{hostile.server.user}:", str(hostile.server.home / ".cache")], check=True)
    db.insert("true", id="gone-job", node_id="box", attempt=1)
    db.conn.execute("UPDATE jobs SET status = 'failed', duration = 5, completed_at = 1 WHERE id = 'gone-job'")
    hostile.on_sweep(f'cd "{jobs_dir}" && ls; yes not-a-directory-name | head -c 300000000\n')
    daemon = daemon_factory(config=FAST + hostile.server.node_config()).start()
    wait_for(lambda: not leftover.exists(), timeout=40, message="the leftover swept")
    peak = _peak_rss_kb(daemon)
    print(f"daemon peak RSS with a sweep listing of 300 MB: {peak / 1024:.0f} MiB")
    assert peak < 150 * 1024
    _still_serves(daemon, db)
