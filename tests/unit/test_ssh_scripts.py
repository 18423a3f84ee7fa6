"""The shell lines the SSH executor sends, run here by a real dash (the strictest `sh` a node is likely to have)
against real process groups: the kill must reach the job's group and never a stranger that got its id later."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.executors.ssh import kill_script, remote_script
from daemon.tools import Command
from tests.conftest import require, wait_for

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    require(shutil.which("dash") is not None, "dash not installed")
    (tmp_path / ".cache" / "nexus-jobd").mkdir(parents=True)
    return tmp_path


@pytest.fixture
def group() -> Iterator[subprocess.Popen[bytes]]:
    """A process group of its own, like the job's on a node."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _dash(script: str, home: Path) -> None:
    subprocess.run(["dash", "-c", script], env={"HOME": str(home), "PATH": os.defpath}, check=True, timeout=10)


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _record(home: Path, line: str) -> Path:
    pid_file = home / ".cache" / "nexus-jobd" / "f"
    pid_file.write_text(line + "\n")
    return pid_file


def test_the_recorded_group_is_killed_and_its_file_removed(home: Path, group: subprocess.Popen[bytes]) -> None:
    pid_file = _record(home, f"{group.pid} {_start_time(group.pid)} {BOOT_ID}")
    _dash(kill_script("f", signal.SIGTERM), home)
    wait_for(lambda: not _alive(group), message="group killed")
    assert pid_file.exists()  # TERM: the job's own shell removes it; the final KILL does
    _dash(kill_script("f", signal.SIGKILL, remove=True), home)
    assert not pid_file.exists()


@pytest.mark.parametrize("stale", ["another start time", "another boot"])
def test_a_stale_pid_file_never_kills_whoever_has_the_id_now(home: Path, group: subprocess.Popen[bytes],
                                                             stale: str) -> None:
    started, boot = _start_time(group.pid), BOOT_ID
    if stale == "another start time":
        started = str(int(started) - 1)
    else:
        boot = "00000000-0000-0000-0000-000000000000"
    _record(home, f"{group.pid} {started} {boot}")
    _dash(kill_script("f", signal.SIGKILL), home)
    assert _alive(group)


def test_the_remote_script_records_what_the_kill_checks(home: Path) -> None:
    command = Command(argv=("cat", str(home / ".cache" / "nexus-jobd" / "f")), cwd=None, env={})
    proc = subprocess.run(["dash", "-c", remote_script(command, "f")], env={"HOME": str(home), "PATH": os.defpath},
                          capture_output=True, text=True, timeout=10, start_new_session=True)
    pid, started, boot = proc.stdout.split()
    assert int(pid) > 0 and started.isdigit() and boot == BOOT_ID
    assert not (home / ".cache" / "nexus-jobd" / "f").exists()  # removed when the job ended


def test_a_group_whose_leader_is_gone_is_still_killed(home: Path) -> None:
    """The leader (the job's shell) may die first; the group id stays reserved while members live."""
    leader = subprocess.Popen(["dash", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert leader.stdout is not None
    member = int(leader.stdout.readline())
    started = _start_time(leader.pid)
    leader.wait()  # the leader has exited and is reaped; its child lives on in the group
    try:
        assert os.getpgid(member) == leader.pid
        _record(home, f"{leader.pid} {started} {BOOT_ID}")
        _dash(kill_script("f", signal.SIGKILL), home)
        wait_for(lambda: not Path(f"/proc/{member}").exists() or
                 Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 message="the member killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
