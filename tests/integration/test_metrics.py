"""[metrics]: the real daemon serves GET /metrics (read with urllib, parsed with prometheus_client's own parser) and
writes the textfile; a port in use stops start-up; an SSH node's dropped connection counts as a reconnect."""

from __future__ import annotations

import os
import platform
import signal
import socket
import stat
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
