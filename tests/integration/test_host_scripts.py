"""The daemon's own short scripts on this host (Executor.run, as the prober uses it), whoever spawns the jobs: the
keeper or the daemon itself, as real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.executors.base import OutputTooLong
from daemon.executors.child import ChildExecutor
from daemon.executors.host import HostExecutor
from daemon.executors.keeper import KeeperExecutor
from daemon.keeper.client import KeeperClient

pytestmark = pytest.mark.anyio


def _local_executors(tmp_path: Path) -> list[HostExecutor]:
    settings = {"base_env": {"PATH": os.defpath, "GREETING": "hello"}, "default_cwd": tmp_path,
                "drain_timeout_s": 1.0}
    return [ChildExecutor(**settings),  # type: ignore[arg-type]
            KeeperExecutor(KeeperClient(str(tmp_path / "jobs.db"), {}), **settings)]  # type: ignore[arg-type]


async def test_a_script_of_the_daemon_s_own_runs_here_in_the_jobs_environment(tmp_path: Path) -> None:
    for executor in _local_executors(tmp_path):
        try:
            assert await executor.run('echo "$GREETING"; echo noise >&2', 10) == "hello\n"
        finally:
            await executor.aclose()  # type: ignore[attr-defined]


async def test_a_script_of_the_daemon_s_own_that_prints_past_its_limit_is_refused_with_what_it_printed(
        tmp_path: Path) -> None:
    for executor in _local_executors(tmp_path):
        with pytest.raises(OutputTooLong) as raised:
            await executor.run("printf 'one\\ntwo\\nthree\\n'", 10, limit=9)
        assert raised.value.complete_lines == "one\ntwo\n"
