"""[metrics]: the real daemon serves GET /metrics (read with urllib, parsed with prometheus_client's own parser) and
writes the textfile; a port in use stops start-up; an SSH node's dropped connection counts as a reconnect."""

from __future__ import annotations

import http.client
import os
import platform
import pwd
import signal
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

import daemon
from tests.conftest import Daemon, Db, now_ms, wait_for
from tests.integration.conftest import Sshd

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def port() -> int:
    """A loopback port that was free a moment ago (the kernel picked it for a socket bound to port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free: int = s.getsockname()[1]
    return free


def samples(text: str, parse: Callable[[str], Iterable[Metric]] = text_string_to_metric_families) -> Samples:
    """(sample name, labels) -> value, as Prometheus would read them."""
    found: Samples = {}
    for family in parse(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return samples(response.read().decode())


def scrape_until(port: int, ready: Callable[[Samples], bool], message: str, timeout: float = 10.0) -> Samples:
    def attempt() -> Samples | None:
        found = scrape(port)
        return found if ready(found) else None

    return wait_for(attempt, timeout, interval=0.2, message=message)


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def finished(found: Samples, status: str) -> float | None:
    return value(found, "nexus_jobd_jobs_finished_total", node="localhost", tool="bash", status=status)


def test_metrics_count_jobs_by_status_and_show_the_queue(db: Db, daemon_factory: Callable[..., Daemon],
                                                         port: int) -> None:
    config = f'[metrics]\nlisten = "127.0.0.1:{port}"\n[nodes.localhost]\nmax_concurrent = 1\n'
    daemon_factory(config).start()
    before = scrape(port)
    assert finished(before, "completed") == 0 and finished(before, "failed") == 0  # every series from the start
    assert value(before, "nexus_jobd_build_info", version=daemon.__version__, python=platform.python_version()) == 1
    assert value(before, "nexus_jobd_node_up", node="localhost") == 1
    assert value(before, "nexus_jobd_db_write_errors_total") == 0

    assert db.wait_status(db.insert("exit 0"))["status"] == "completed"
    assert db.wait_status(db.insert("exit 3", created_at=now_ms() - 60_000))["status"] == "failed"  # waited 60 s
    sleeper = db.insert("echo up; sleep 60")
    wait_for(lambda: db.job(sleeper)["stdout"] == "up\n", message="the sleeper running")
    waiting = [db.insert("exit 0"), db.insert("exit 0")]  # the node runs one at a time: these wait
    during = scrape_until(port, lambda s: value(s, "nexus_jobd_jobs_queued", node="localhost") == 2,
                          "two queued rows in the gauge")
    assert value(during, "nexus_jobd_jobs_running", node="localhost") == 1
    assert (finished(during, "completed"), finished(during, "failed"), finished(during, "cancelled")) == (1, 1, 0)
    assert value(during, "nexus_jobd_job_duration_seconds_count", node="localhost", tool="bash") == 2
    assert value(during, "nexus_jobd_pickup_latency_seconds_count", node="localhost") == 3  # three claimed
    assert value(during, "nexus_jobd_pickup_latency_seconds_bucket", node="localhost", le="15.0") == 2
    assert 60 <= (value(during, "nexus_jobd_pickup_latency_seconds_sum", node="localhost") or 0) < 75
    age = value(during, "nexus_jobd_node_heartbeat_age_seconds", node="localhost")
    assert age is not None and 0 <= age < 20  # the first heartbeat is written at start; the interval is 15 s

    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?", (now_ms(), sleeper))
    assert db.wait_status(sleeper)["status"] == "cancelled"
    for job_id in waiting:
        assert db.wait_status(job_id)["status"] == "completed"
    after = scrape_until(port, lambda s: finished(s, "completed") == 3, "three completed in the counter")
    assert (finished(after, "failed"), finished(after, "cancelled")) == (1, 1)
    assert value(after, "nexus_jobd_job_duration_seconds_count", node="localhost", tool="bash") == 5
    assert value(after, "nexus_jobd_pickup_latency_seconds_count", node="localhost") == 5
    assert value(after, "nexus_jobd_jobs_queued", node="localhost") == 0
    assert value(after, "nexus_jobd_jobs_running", node="localhost") == 0
    assert value(after, "nexus_jobd_db_write_errors_total") == 0


def test_the_endpoint_speaks_openmetrics_and_answers_only_metrics(db: Db, daemon_factory: Callable[..., Daemon],
                                                                   port: int) -> None:
    daemon_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        found = samples(response.read().decode(), openmetrics_families)
    assert value(found, "nexus_jobd_node_up", node="localhost") == 1
    with pytest.raises(urllib.error.HTTPError) as not_found:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert not_found.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as not_allowed:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x"), timeout=10)
    assert not_allowed.value.code == 405
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # not HTTP at all: 400, then closed
        s.sendall(b"hello\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


def test_a_port_in_use_stops_start_up_with_exit_2(db: Db, daemon_factory: Callable[..., Daemon], port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        started = daemon_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start(wait_ready=False)
        assert started.proc is not None and started.proc.wait(15) == 2
    message = started.log()
    assert f"[metrics] listen = '127.0.0.1:{port}': port {port} is already in use on 127.0.0.1" in message
    assert str(started.config_path) in message and "choose another port" in message
    assert "dispatch.started" not in message
    assert db.conn.execute("SELECT count(*) FROM jobd_workers").fetchone()[0] == 0  # stopped before registering


def test_the_textfile_is_written_at_start_and_once_more_at_stop(db: Db, daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    directory = tmp_path / "textfile"
    directory.mkdir()
    path = directory / "nexus-jobd.prom"
    daemon_under_test = daemon_factory(f'[metrics]\ntextfile = "{path}"\n')
    umask = os.umask(0o077)  # as the systemd unit's UMask=0077: node_exporter (another user) must still read it
    try:
        daemon_under_test.start()
    finally:
        os.umask(umask)
    first = wait_for(lambda: path.exists() and samples(path.read_text()), message="the textfile at start")
    assert value(first, "nexus_jobd_node_up", node="localhost") == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert db.wait_status(db.insert("exit 0"))["status"] == "completed"
    assert db.wait_status(db.insert("exit 7"))["status"] == "failed"
    queued = db.insert("exit 0", run_after=now_ms() + 3_600_000)  # waits an hour
    assert daemon_under_test.stop() == 0
    last = samples(path.read_text())
    assert (finished(last, "completed"), finished(last, "failed"), finished(last, "cancelled")) == (1, 1, 0)
    assert value(last, "nexus_jobd_jobs_queued", node="localhost") == 1
    assert db.job(queued)["status"] == "queued"
    assert sorted(p.name for p in directory.iterdir()) == ["nexus-jobd.prom"]  # no temporary file left


def test_an_ssh_reconnect_is_counted(sshd: Sshd, db: Db, daemon_factory: Callable[..., Daemon], port: int) -> None:
    config = (f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\nheartbeat_interval_ms = 200\n'
              + sshd.node_config(keepalive_interval_ms=300, keepalive_count_max=2))
    daemon_factory(config).start()
    assert db.wait_status(db.insert("exit 0", node_id="box"), timeout=30)["status"] == "completed"
    first = scrape_until(port, lambda s: value(s, "nexus_jobd_node_up", node="box") == 1, "box up", timeout=30)
    assert value(first, "nexus_jobd_ssh_reconnects_total", node="box") == 0
    for pid in sshd.sshd_processes():  # the connection's sshd processes, not the listener: the link drops
        os.kill(pid, signal.SIGKILL)
    scrape_until(port, lambda s: value(s, "nexus_jobd_ssh_reconnects_total", node="box") == 1, "one reconnect",
                 timeout=30)
    assert db.wait_status(db.insert("exit 0", node_id="box"), timeout=30)["status"] == "completed"
    assert value(scrape(port), "nexus_jobd_ssh_reconnects_total", node="box") == 1


def test_a_textfile_in_a_missing_directory_stops_start_up_with_exit_2(db: Db, daemon_factory: Callable[..., Daemon],
                                                                       tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "nexus-jobd.prom"
    started = daemon_factory(f'[metrics]\ntextfile = "{path}"\n').start(wait_ready=False)
    assert started.proc is not None and started.proc.wait(15) == 2
    assert (f"[metrics] textfile = '{path}': the directory {path.parent} does not exist; create it"
            in started.log())


def test_a_symlink_planted_at_the_textfiles_temporary_name_is_never_followed(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    """Another user who may write the textfile directory plants `<path>.tmp` -> a private file of the daemon's
    user: the daemon neither writes through it nor changes its mode."""
    directory = tmp_path / "shared-textfile"
    directory.mkdir()
    directory.chmod(0o777)  # not sticky: fs.protected_symlinks would not stop the daemon following the link
    victim = tmp_path / "private"
    victim.write_text("secret\n")
    victim.chmod(0o600)
    path = directory / "nexus-jobd.prom"
    planted = directory / "nexus-jobd.prom.tmp"
    planted.symlink_to(victim)
    nobody = pwd.getpwnam("nobody")
    os.lchown(planted, nobody.pw_uid, nobody.pw_gid)  # the link is the other user's
    daemon_factory(f'[metrics]\ntextfile = "{path}"\n').start()
    written = wait_for(lambda: path.exists() and samples(path.read_text()), message="the textfile at start")
    assert value(written, "nexus_jobd_node_up", node="localhost") == 1
    assert (victim.read_text(), stat.S_IMODE(victim.stat().st_mode)) == ("secret\n", 0o600)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and not path.is_symlink()


def _open_files(daemon: Daemon) -> tuple[int, int]:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """Connections that never send a byte (connect without waiting: the daemon decides what to accept)."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    return held


def _scrape_or_none(port: int) -> Samples | None:
    """A scrape, or None while the daemon closes connections unanswered (it has as many as it takes)."""
    try:
        return scrape(port)
    except (OSError, http.client.HTTPException):
        return None


@pytest.mark.parametrize("keeper", [False, True])
def test_idle_connections_cannot_take_the_daemons_descriptors(db: Db, daemon_factory: Callable[..., Daemon],
                                                              port: int, keeper: bool) -> None:
    """Hundreds of connections that send nothing, to a daemon allowed 256 descriptors (that spawns its own jobs,
    or has the keeper spawn them): its jobs still start, and /metrics answers again once the idle ones have timed
    out."""
    config = f'[metrics]\nlisten = "127.0.0.1:{port}"\n[daemon]\nkeeper = {str(keeper).lower()}\n'
    daemon = daemon_factory(config, prefix=["prlimit", "--nofile=256:256", "--"]).start()
    held = _idle_connections(port, 600)
    try:
        time.sleep(1)  # the daemon takes what it takes of them
        jobs = [db.insert(f"echo {i}") for i in range(6)]
        rows = [db.wait_status(job_id, timeout=30) for job_id in jobs]
        assert [(r["status"], r["stdout"]) for r in rows] == [("completed", f"{i}\n") for i in range(6)], rows
        started = time.monotonic()
        found = wait_for(lambda: _scrape_or_none(port), timeout=30, interval=0.2,
                         message="an answer once the idle connections timed out")
        print(f"/metrics answered {time.monotonic() - started:.1f} s after the jobs")
        assert finished(found, "completed") == 6
    finally:
        for s in held:
            s.close()
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_the_soft_descriptor_limit_is_raised_at_start_up(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(prefix=["prlimit", "--nofile=256:4096", "--"]).start()
    assert _open_files(daemon) == (4096, 4096)


def test_accept_errors_are_logged_a_few_times_not_flooded(db: Db, daemon_factory: Callable[..., Daemon],
                                                          port: int) -> None:
    """Out of descriptors (set from outside with prlimit, as another part of the daemon could use them up),
    every accept fails: that is said once in a while, with how many failed, not a hundred times a tick."""
    daemon = daemon_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n').start()
    assert daemon.proc is not None
    in_use = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    soft, hard = _open_files(daemon)
    subprocess.run(["prlimit", f"--pid={daemon.proc.pid}", f"--nofile={in_use + 1}:{hard}"], check=True)
    held = _idle_connections(port, 200)
    try:
        time.sleep(4)
        lines = [line for line in daemon.log().splitlines()
                 if "out of system resource" in line or "metrics.accept_failed" in line]
        print(f"{len(lines)} log lines about failed accepts in 4 s, {len(daemon.log())} bytes of log")
        assert 1 <= len(lines) <= 3, lines[:5]
        assert daemon.events("metrics.accept_failed")
    finally:
        for s in held:
            s.close()
    subprocess.run(["prlimit", f"--pid={daemon.proc.pid}", f"--nofile={soft}:{hard}"], check=True)
    wait_for(lambda: _scrape_or_none(port), timeout=30, interval=0.2, message="answering again")
    assert daemon.proc.poll() is None
