"""[nodes.X] limits as each sh a node may have applies them: set in bytes before the job starts, or the job stopped
with the node's refusal as its reason."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from daemon.tools import with_limits
from tests.conftest import require

LIMITS = {"cpu_seconds": 7, "file_size_bytes": 1 << 20, "processes": 500, "open_files": 64, "memory_bytes": 1 << 31}


def _limits_of(shell: list[str], limits: dict[str, int]) -> subprocess.CompletedProcess[str]:
    wrapped = with_limits(("cat", "/proc/self/limits"), limits)
    assert wrapped[0] == "sh"
    return subprocess.run([*shell, *wrapped[1:]], capture_output=True, text=True, timeout=10)


@pytest.mark.parametrize("shell", [["dash"], ["busybox", "sh"], ["bash", "--posix"]], ids=lambda s: s[0])
def test_every_sh_a_node_may_have_sets_the_limits_in_bytes_before_the_job_starts(shell: list[str]) -> None:
    require(shutil.which(shell[0]) is not None, f"{shell[0]} not installed")
    result = _limits_of(shell, LIMITS)
    assert result.returncode == 0, result.stderr
    # /proc/self/limits of the job's own process: "Max cpu time  <soft>  <hard>  <units>"
    rows = {line[:26].strip(): line[26:].split()[:2] for line in result.stdout.splitlines()[1:]}
    assert rows["Max cpu time"] == ["7", "8"]  # SIGXCPU at the soft limit, SIGKILL a second later
    assert rows["Max file size"] == [str(1 << 20)] * 2
    assert rows["Max processes"] == ["500"] * 2
    assert rows["Max open files"] == ["64"] * 2
    assert rows["Max address space"] == [str(1 << 31)] * 2


def test_a_limit_the_host_refuses_stops_the_job_with_the_reason() -> None:
    result = _limits_of(["sh"], {"open_files": 10**12})  # far above any hard limit, even root's nr_open
    assert (result.returncode, result.stdout) == (125, "")
    assert "nexus-jobd: this node refused [limits] open_files = 1000000000000" in result.stderr
