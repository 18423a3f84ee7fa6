"""The daemon as a service: systemd units that verify, the sd_notify protocol on a real datagram socket, SIGHUP
reload, and the operations commands (status, backup, prune)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import VENV_BIN, Daemon, Db, cli, daemon_looked, now_ms, require, wait_for

ROOT = Path(__file__).parent.parent.parent


@pytest.mark.parametrize(("unit", "placeholder", "user"), [
    ("systemd/nexus-jobd.service", "/opt/nexus-jobd/bin/nexus-jobd", False),
    ("systemd/user/nexus-jobd.service", "%h/.local/share/nexus-jobd/bin/nexus-jobd", True),
    ("systemd/nexus-jobd-web.service", "/opt/nexus-jobd/bin/nexus-jobd", False),
    ("systemd/user/nexus-jobd-web.service", "%h/.local/share/nexus-jobd/bin/nexus-jobd", True),
])
def test_systemd_units_verify_without_a_word(unit: str, placeholder: str, user: bool, tmp_path: Path) -> None:
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed (Debian: systemd)")
    text = (ROOT / unit).read_text()
    assert placeholder in text
    # The one change: ExecStart points at this checkout's nexus-jobd, so verify can check it is executable.
    copy = tmp_path / Path(unit).name
    copy.write_text(text.replace(placeholder, str(VENV_BIN / "nexus-jobd")))
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(["systemd-analyze", "verify", *(["--user"] if user else []), str(copy)],
                            capture_output=True, text=True, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    # systemd-analyze verify exits 0 even on some errors: any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


class NotifySocket:
    """systemd's end of sd_notify: a unix datagram socket that records what arrives, with arrival times."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def collect(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def with_field(self, field: str) -> list[float]:
        return [t for t, m in self.collect() if field in m.splitlines()]


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    address = str(tmp_path / "notify.sock") if request.param == "path" else f"@nexus-jobd-test-{os.getpid()}"
    receiver = NotifySocket(address)
    yield address, receiver
    receiver.sock.close()


def test_sd_notify_ready_watchdog_status_stopping(db: Db, daemon_factory: Callable[..., Daemon],
                                                 notify_socket: tuple[str, NotifySocket]) -> None:
    address, receiver = notify_socket
    daemon = daemon_factory(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}).start(wait_ready=False)
    ready_at = wait_for(lambda: receiver.with_field("READY=1"), timeout=15, message="READY=1")[0]
    # READY comes only once the database is migrated and the dispatcher runs.
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "jobd_workers" in tables and daemon.events("dispatch.started")
    wait_for(lambda: len([t for t in receiver.with_field("WATCHDOG=1") if t > ready_at]) >= 6, timeout=10,
             message="six watchdog pings")
    pings = [t for t in receiver.with_field("WATCHDOG=1") if t > ready_at]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    # Every half WATCHDOG_USEC (0.5 s). The times are when this test read them, so one gap may shrink if the
    # test stalls: systemd's real limit is the whole 1 s for each gap, and the average shows the pace.
    assert all(gap < 1.0 for gap in gaps) and 0.3 <= sum(gaps) / len(gaps) <= 0.7, gaps
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert receiver.with_field("STOPPING=1")


def test_sighup_reload_raises_a_limit_without_disturbing_a_running_job(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    daemon = daemon_factory(config="[daemon]\nmax_concurrent = 1\n").start()
    gate = tmp_path / "gate"
    first = db.insert(f"echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo done")
    db.wait_status(first, ("executing",))
    second = db.insert("echo second")
    daemon_looked(db)  # a negative check: the daemon went through the queue and left it, the limit being 1
    assert db.job(second)["status"] == "queued"
    assert daemon.config_path is not None and daemon.proc is not None
    daemon.config_path.write_text("[daemon]\nmax_concurrent = 2\n")
    daemon.proc.send_signal(signal.SIGHUP)
    assert db.wait_status(second)["status"] == "completed"
    assert db.job(first)["status"] == "executing"  # untouched by the reload
    reloaded = wait_for(lambda: daemon.events("config.reloaded"), message="config.reloaded")[0]
    assert reloaded["changed"]["max_concurrent"] == "2"
    # A config that no longer loads: the daemon keeps the one it has and says why.
    daemon.config_path.write_text("[daemon]\nmax_concurrent = 'many'\n")
    daemon.proc.send_signal(signal.SIGHUP)
    failed = wait_for(lambda: daemon.events("config.reload_failed"), message="config.reload_failed")[0]
    assert "max_concurrent" in failed["error"]
    gate.touch()
    row = db.wait_status(first)
    assert (row["status"], row["stdout"]) == ("completed", "first\ndone\n")
    assert daemon.proc.poll() is None


def test_status_backup_and_prune(daemon: Daemon, db: Db, tmp_path: Path) -> None:
    old = db.insert("echo old")
    db.wait_status(old)
    db.conn.execute("UPDATE jobs SET completed_at = ? WHERE id = ?", (now_ms() - 40 * 86_400_000, old))
    recent = db.insert("echo recent")
    db.wait_status(recent)

    status = cli(db, "status")
    assert "alive, up" in status.stdout and f"pid {daemon.proc.pid if daemon.proc else 0}" in status.stdout
    counts = json.loads(cli(db, "status", "--json").stdout)["jobs"]
    assert counts["queued"] == 0 and counts["finished_last_hour"] >= 1

    backup = tmp_path / "copy.db"
    cli(db, "backup", str(backup))
    copied = sqlite3.connect(backup)
    assert {r[0] for r in copied.execute("SELECT id FROM jobs")} == {old, recent}
    assert copied.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copied.close()
    assert os.stat(backup).st_mode & 0o777 == 0o600
    again = cli(db, "backup", str(backup), check=False)
    assert again.returncode == 1 and "exists" in again.stderr

    assert cli(db, "prune", "--older-than", "30d").stdout.startswith("deleted 1 ")
    assert {r[0] for r in db.conn.execute("SELECT id FROM jobs")} == {recent}
    assert cli(db, "prune", "--older-than", "soon", check=False).returncode == 2


def test_sigusr1_and_sigusr2_are_ignored_by_daemon_and_keeper_and_jobs_get_the_default(
        daemon: Daemon, db: Db, tmp_path: Path) -> None:
    """Their default action kills: a stray `kill -USR1` must take down neither the daemon (its lease held) nor the
    keeper (with every job it holds). A job started afterwards still dies of SIGUSR1, as any program would."""
    from tests.conftest import keeper_pids

    gate = tmp_path / "gate"
    running = db.insert(f"echo up; while [ ! -e {gate} ]; do sleep 0.02; done; echo done")
    wait_for(lambda: db.job(running)["stdout"] == "up\n", message="the job to run")
    assert daemon.proc is not None
    keeper = wait_for(lambda: keeper_pids(db.path), message="the keeper")[0]
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        daemon.proc.send_signal(signum)
        os.kill(keeper, signum)
    ignored = wait_for(lambda: len(e := daemon.events("daemon.signal_ignored")) == 2 and e, message="two warnings")
    assert sorted(e["signal"] for e in ignored) == ["SIGUSR1", "SIGUSR2"]
    gate.touch()
    row = db.wait_status(running)
    assert (row["status"], row["stdout"], row["attempt"]) == ("completed", "up\ndone\n", 1)
    assert daemon.proc.poll() is None and keeper_pids(db.path) == [keeper]
    shot = db.wait_status(db.insert("kill -USR1 $$; echo survived"))
    assert (shot["status"], shot["exit_code"], shot["stdout"]) == ("failed", 128 + signal.SIGUSR1, "")
