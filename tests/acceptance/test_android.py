"""On Android: the daemon as it runs under Termux, emulated (a $PREFIX under com.termux, TERMUX_VERSION, and
termux-wake-lock / termux-wake-unlock scripts on PATH that record their calls): the wake lock follows the jobs; a
job killed by a SIGKILL nobody here sent says so in its row."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Daemon, Db, daemon_looked, now_ms, wait_for

RELEASE_MS = 1500


class Termux:
    """A Termux-like $PREFIX (under data/data/com.termux) whose bin/ holds the wake lock's commands, each appending
    `<name> <epoch ms>` to calls.log; `failing` ones print a reason and exit 1, `missing` ones are not there."""

    def __init__(self, root: Path, *, failing: bool = False, missing: bool = False) -> None:
        self.prefix = root / "data" / "data" / "com.termux" / "files" / "usr"
        self.bin = self.prefix / "bin"
        self.bin.mkdir(parents=True)
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
