"""On Android: the daemon as it runs under Termux, emulated (a $PREFIX under com.termux, TERMUX_VERSION, and
termux-wake-lock / termux-wake-unlock scripts on PATH that record their calls): the wake lock follows the jobs; a
job killed by a SIGKILL nobody here sent says so in its row."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from daemon.keeper import protocol as p
from tests import nolocks_fs
from tests.acceptance.test_termux_service import ROOT, Runit
from tests.conftest import (
    NEXUS_JOBD,
    Daemon,
    Db,
    daemon_looked,
    kill_keeper,
    now_ms,
    require,
    run_cli,
    start_keeper,
    wait_for,
)

RELEASE_MS = 1500


class Termux:
    """A Termux-like $PREFIX (under data/data/com.termux) whose bin/ holds the wake lock's commands, each appending
    `<name> <epoch ms>` to calls.log; `failing` ones print a reason and exit 1, `missing` ones are not there."""

    def __init__(self, root: Path, *, failing: bool = False, missing: bool = False, prefix: Path | None = None) -> None:
        self.prefix = prefix or root / "data" / "data" / "com.termux" / "files" / "usr"
        self.bin = self.prefix / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        self.calls_log = root / "calls.log"
        for name in ("termux-wake-lock", "termux-wake-unlock"):
            if missing:
                continue
            fail = 'echo "Error: the Termux app is not running" >&2; exit 1\n' if failing else ""
            script = self.bin / name
            script.write_text(f'#!/bin/sh\necho "{name} $(($(date +%s%N) / 1000000))" >> "{self.calls_log}"\n{fail}')
            script.chmod(0o755)

    def env(self) -> dict[str, str]:
        return {"TERMUX_VERSION": "0.118.1", "PREFIX": str(self.prefix),
                "PATH": f"{self.bin}:{os.environ.get('PATH', os.defpath)}"}

    def calls(self) -> list[tuple[str, int]]:
        if not self.calls_log.exists():
            return []
        return [(name, int(ms)) for name, ms in (line.split() for line in self.calls_log.read_text().splitlines())]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls()]


def _config(wake_lock: str | None = None, release_ms: int = RELEASE_MS) -> str:
    text = f"[android]\nwake_lock_release_ms = {release_ms}\n"
    return text + (f'wake_lock = "{wake_lock}"\n' if wake_lock else "")


def test_the_lock_is_taken_at_the_first_job_and_released_after_the_last_once_under_200_jobs_in_bursts(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    termux = Termux(tmp_path)
    daemon = daemon_factory(_config(), env=termux.env()).start()
    daemon_looked(db)
    assert termux.calls() == []  # an idle daemon takes no lock
    ids: list[str] = []
    for burst in range(5):  # 40 jobs at once, a pause far shorter than the release delay, again
        ids += [db.insert(f"echo {burst}-{i}") for i in range(40)]
        time.sleep(0.2)
    rows = [db.wait_status(job_id, timeout=60) for job_id in ids]
    assert all(row["status"] == "completed" for row in rows)
    last_end = max(row["completed_at"] for row in rows)
    wait_for(lambda: "termux-wake-unlock" in termux.names(), timeout=RELEASE_MS / 1000 + 10,
             message="the lock released after the last job")
    (lock, locked_at), (unlock, unlocked_at) = termux.calls()
    assert (lock, unlock) == ("termux-wake-lock", "termux-wake-unlock")
    assert min(row["started_at"] for row in rows) - 1000 <= locked_at <= last_end
    assert unlocked_at >= last_end + RELEASE_MS - 50  # a short while after the last job, not before
    wait_for(lambda: [e["held"] for e in daemon.events("android.wake_lock")] == [True, False],
             message="android.wake_lock logged as taken, then released")
    daemon.stop()
    assert termux.names() == ["termux-wake-lock", "termux-wake-unlock"]  # nothing more at the stop


def test_a_stop_releases_the_lock_taken_for_jobs_at_once(db: Db, daemon_factory: Callable[..., Daemon],
                                                          tmp_path: Path) -> None:
    termux = Termux(tmp_path)
    daemon = daemon_factory(_config(release_ms=600_000), env=termux.env()).start()
    db.wait_status(db.insert("true"))
    wait_for(lambda: termux.names() == ["termux-wake-lock"], message="the lock taken")
    assert daemon.stop() == 0
    assert termux.names() == ["termux-wake-lock", "termux-wake-unlock"]


@pytest.mark.parametrize("failing", [True, False], ids=["failing", "missing"])
def test_a_failing_or_missing_lock_command_is_logged_once_with_the_fix_and_jobs_run(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, failing: bool) -> None:
    termux = Termux(tmp_path, failing=failing, missing=not failing)
    daemon = daemon_factory(_config(release_ms=0), env=termux.env()).start()
    for _ in range(3):  # each a burst of its own: the lock is tried again for each
        row = db.wait_status(db.insert("echo ran"))
        assert (row["status"], row["stdout"]) == ("completed", "ran\n")
    if failing:
        wait_for(lambda: termux.names().count("termux-wake-lock") == 3, message="three tries")
    failures = daemon.events("android.wake_lock_failed")
    assert len(failures) == 1, failures
    assert failures[0]["command"] == "termux-wake-lock"
    assert ("the Termux app is not running" if failing else "is not on PATH") in failures[0]["error"]
    assert 'wake_lock = "never"' in failures[0]["fix"]
    assert ("Termux session" if failing else "pkg install termux-tools") in failures[0]["fix"]
    assert not daemon.events("android.wake_lock")  # never said to be held


def test_always_takes_the_lock_at_start_and_never_releases_it(db: Db, daemon_factory: Callable[..., Daemon],
                                                              tmp_path: Path) -> None:
    termux = Termux(tmp_path)
    daemon = daemon_factory(_config("always", release_ms=0), env=termux.env()).start()
    wait_for(lambda: termux.names() == ["termux-wake-lock"], message="the lock taken at start")
    for _ in range(3):
        db.wait_status(db.insert("true"))
    daemon_looked(db)
    assert daemon.stop() == 0
    assert termux.names() == ["termux-wake-lock"]


@pytest.mark.parametrize("where", ["never", "off Termux"])
def test_never_and_off_termux_touch_no_lock(db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                            where: str) -> None:
    termux = Termux(tmp_path)
    env = termux.env()
    if where == "off Termux":
        env = {"PATH": env["PATH"], "PREFIX": "/usr"}
    daemon = daemon_factory(_config("never" if where == "never" else None, release_ms=0), env=env).start()
    for _ in range(3):
        db.wait_status(db.insert("true"))
    daemon_looked(db)
    assert daemon.stop() == 0
    assert termux.calls() == [] and not daemon.events("android.wake_lock_failed")


def _running(db: Db, job_id: str) -> int:
    row = wait_for(lambda: (r := db.job(job_id))["pid"] and "started" in (r["stdout"] or "") and r,
                   message=f"{job_id} running")
    return int(row["pid"])


def _counted(textfile: Path) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(textfile.read_text()):
        for sample in family.samples:
            if sample.name == "nexus_jobd_jobs_killed_outside_total" and sample.labels == {"node": "localhost"}:
                return sample.value
    raise AssertionError("nexus_jobd_jobs_killed_outside_total{node=localhost} is not in the textfile")


@pytest.mark.parametrize(("on_termux", "keeper"), [(True, True), (True, False), (False, True)],
                         ids=["Termux", "Termux, keeper = false", "Linux"])
def test_a_job_sigkilled_from_outside_says_so_is_retried_when_allowed_and_counted(
        db: Db, daemon_factory: Callable[..., Daemon], tmp_path: Path, on_termux: bool, keeper: bool) -> None:
    textfile = tmp_path / "metrics.prom"
    config = f'[daemon]\nkeeper = {str(keeper).lower()}\n[metrics]\ntextfile = "{textfile}"\n'
    daemon = daemon_factory(config, env=Termux(tmp_path).env() if on_termux else {}).start()
    job_id = db.insert("echo started; sleep 60")
    os.kill(_running(db, job_id), signal.SIGKILL)  # the main process only, as Android's killer may
    row = db.wait_status(job_id)
    assert (row["status"], row["exit_code"]) == ("failed", 137)
    assert "killed by signal 9 (SIGKILL), which nexus-jobd did not send" in row["error"], row["error"]
    if on_termux:
        assert "phantom process killer" in row["error"] and "max_phantom_processes 2147483647" in row["error"]
        assert "Disable child process restrictions" in row["error"]
    else:
        assert "OOM killer" in row["error"] and "phantom" not in row["error"]

    runs = tmp_path / "runs"  # killed on its first run only; the retry completes
    job_id = db.insert(f'echo run >> "{runs}"; echo started; [ "$(wc -l < "{runs}")" -gt 1 ] || sleep 60',
                       max_attempts=2)
    os.kill(_running(db, job_id), signal.SIGKILL)
    row = db.wait_status(job_id, timeout=30)
    assert (row["status"], row["attempt"], row["error"]) == ("completed", 2, None)
    requeued = [e for e in daemon.events("job.requeued") if e["job_id"] == job_id]
    assert len(requeued) == 1 and "which nexus-jobd did not send" in requeued[0]["error"]
    assert daemon.stop() == 0
    assert _counted(textfile) == 2


def test_a_kill_of_the_daemons_own_is_not_called_an_outside_kill(db: Db, daemon_factory: Callable[..., Daemon],
                                                                 tmp_path: Path) -> None:
    """Each ends by a SIGKILL: the daemon's after a timeout or a cancel (the job ignores SIGTERM), the kernel's at
    the cpu_seconds hard limit (the job ignores SIGXCPU). None of them is a stranger's."""
    config = "[daemon]\nkill_grace_ms = 300\n[nodes.localhost.limits]\ncpu_seconds = 1\n"
    daemon_factory(config, env=Termux(tmp_path).env()).start()
    stubborn = 'trap "" TERM; echo started; while :; do sleep 0.1; done'
    timed_out = db.insert(stubborn, timeout_ms=1000)
    cancelled = db.insert(stubborn)
    spinning = db.insert('trap "" XCPU; echo started; while :; do :; done')
    _running(db, cancelled)
    db.conn.execute("UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?", (now_ms(), cancelled))
    row = db.wait_status(timed_out, timeout=30)
    assert (row["status"], row["exit_code"], row["error"]) == ("failed", 124, "timed out after 1s (timeout_ms=1000) "
                                                                              "and was killed")
    row = db.wait_status(cancelled, timeout=30)
    assert (row["status"], row["exit_code"], row["error"]) == ("cancelled", 137, None)
    row = db.wait_status(spinning, timeout=30)
    assert (row["status"], row["exit_code"]) == ("failed", 137)
    assert row["error"] == "killed by signal 9 (SIGKILL) at its cpu_seconds limit (1 s of CPU)"


def _doctor(env: dict[str, str], *args: str) -> tuple[int, dict[str, tuple[str, str | None]]]:
    """`nexus-jobd doctor --json` in this environment: its exit code, and each check's state and fix."""
    result = subprocess.run([*NEXUS_JOBD, *args, "doctor", "--json"], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.startswith("NEXUS_JOBD_")} | env)
    assert result.stdout, result.stderr
    found = json.loads(result.stdout)
    return result.returncode, {c["check"]: (c["state"], c["fix"]) for c in found["checks"]}


def test_doctor_tells_a_termux_user_what_is_missing(tmp_path: Path) -> None:
    """Under real runit (runsv running the project's service, as termux-services does), in an emulated Termux."""
    require(all(shutil.which(p) for p in ("runsv", "sv", "svlogd")), "runit is not installed (Debian: runit)")
    runit = Runit(tmp_path / "data" / "data" / "com.termux" / "files")
    try:
        termux = Termux(tmp_path / "termux", prefix=runit.prefix)
        for name, script in (("service-daemon", "exit 0"),  # termux-services' own starter: here runsv is started
                             ("getprop", 'case "$1" in ro.build.version.sdk) echo 34;; *) echo true;; esac')):
            (runit.prefix / "bin" / name).write_text(f"#!/bin/sh\n{script}\n")
            (runit.prefix / "bin" / name).chmod(0o755)
        env = runit.env | termux.env() | {"HOME": str(runit.home)}
        wait_for(lambda: runit.events("dispatch.started"), timeout=20, message="the service's daemon running")
        code, checks = _doctor(env)
        assert code == 1
        assert {name: state for name, (state, _) in checks.items()} == {
            "termux-services": "ok", "service nexus-jobd": "ok", "Termux:Boot": "missing", "wake lock": "ok",
            "battery optimisation": "unknown", "phantom process killer": "unknown", "SQLite locking": "ok"}
        assert "~/.termux/boot/" in str(checks["Termux:Boot"][1])
        assert "max_phantom_processes 2147483647" in str(checks["phantom process killer"][1])

        boot = runit.home / ".termux" / "boot"
        boot.mkdir(parents=True)
        shutil.copy(ROOT / "termux-services" / "boot" / "start-services", boot)  # the README's script
        (termux.bin / "getprop").write_text('#!/bin/sh\ncase "$1" in ro.build.version.sdk) echo 34;; '
                                            '*) echo false;; esac\n')  # "Disable child process restrictions"
        (termux.bin / "getprop").chmod(0o755)
        code, checks = _doctor(env)
        assert code == 0 and checks["Termux:Boot"][0] == checks["phantom process killer"][0] == "ok", checks

        (termux.bin / "termux-wake-unlock").unlink()
        runit.sv("down")
        wait_for(lambda: runit.sv("status").startswith("down:"), timeout=40, message="sv down")
        code, checks = _doctor(env)
        assert code == 1
        assert checks["service nexus-jobd"] == ("failed", checks["service nexus-jobd"][1])
        assert checks["wake lock"] == ("missing", "pkg install termux-tools")
        (runit.service / "down").touch()  # what sv-disable leaves
        assert _doctor(env)[1]["service nexus-jobd"] == ("missing", "sv-enable nexus-jobd")
    finally:
        runit.close()


def test_doctor_off_termux_checks_only_the_database_filesystem(db: Db, tmp_path: Path) -> None:
    code, checks = _doctor({"HOME": str(tmp_path), "PREFIX": "/usr"}, "--db", db.target)
    assert (code, checks) == (0, {"SQLite locking": ("ok", checks["SQLite locking"][1])})


def test_a_database_on_a_filesystem_that_does_not_share_locks_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A real FUSE filesystem that grants every lock to everyone (tests/nolocks_fs.py), as Android's shared storage
    may: the daemon, `db migrate` and `doctor` find out with a real lock held by a second process, and refuse."""
    require(nolocks_fs.can_mount(), "mounting a FUSE filesystem needs root and /dev/fuse")
    with nolocks_fs.mounted(tmp_path / "sdcard", tmp_path / "backing") as sdcard:
        database = str(sdcard / "nexuscli.db")
        for args in (["run"], ["db", "migrate"]):
            result = run_cli(["--db", database, *args], tmp_path / "home", timeout=30)
            assert result.returncode == 2, (args, result.stdout, result.stderr)
            assert f"{database}: SQLite's locking does not hold on this filesystem: a lock another process held " \
                   "on a file there was granted to this one too" in result.stderr, result.stderr
            assert "not on shared storage such as /sdcard" in result.stderr
        code, checks = _doctor({"HOME": str(tmp_path / "home")}, "--db", database)
        assert code == 1 and checks["SQLite locking"][0] == "failed"
        assert os.listdir(tmp_path / "backing") == []  # no database was made there, no probe left behind


def _exit_of(sock: socket.socket, handle: int) -> list[int]:
    buf = b""
    while True:
        data = sock.recv(1 << 16)
        assert data, "the keeper closed the connection"
        buf += data
        while len(buf) >= p.HEADER.size and len(buf) >= p.HEADER.size + (size := p.HEADER.unpack_from(buf)[2]):
            kind, got, _ = p.HEADER.unpack_from(buf)
            payload, buf = buf[p.HEADER.size:p.HEADER.size + size], buf[p.HEADER.size + size:]
            if kind == p.EXIT and got == handle:
                return [int(n) for n in payload.split()]


def test_the_keeper_says_who_signalled_a_job_only_to_a_daemon_that_asks(tmp_path: Path) -> None:
    """EXIT's SENT (the last signal the keeper sent the job for a daemon) and CPU_MS go only to a daemon whose HELLO
    says it reads them: a daemon from before them, which a keeper started from newer code may meet during an
    upgrade, still gets CODE SIGNAL."""
    database = tmp_path / "keeper.db"
    address = start_keeper(database)
    try:
        for hello, handle in ((p.pack(p.VERSION), 1), (p.pack(p.VERSION, p.EXIT_WHO), 2)):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(address)
                sock.sendall(p.frame(p.HELLO, 0, hello))
                argv = ["/bin/sh", "-c", "sleep 30"]
                sock.sendall(p.frame(p.SPAWN, handle, p.pack(f"job:{handle}", 1024, 0.1, str(tmp_path), len(argv),
                                                             *argv, "PATH=/usr/bin:/bin")))
                sock.sendall(p.frame(p.SIGNAL, handle, b"%d" % signal.SIGKILL))
                fields = _exit_of(sock, handle)
            assert fields[:2] == [128 + signal.SIGKILL, signal.SIGKILL]
            assert len(fields) == (2 if handle == 1 else 4)
            if len(fields) == 4:
                assert fields[2] == signal.SIGKILL and 0 <= fields[3] < 1000
    finally:
        kill_keeper(database)
