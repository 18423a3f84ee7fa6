"""The executors' one interface as the rest of the daemon uses it: probing a node through whatever executor runs
its jobs, and the daemon's own short scripts on this host, whoever spawns the jobs (the keeper or the daemon)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon import service
from daemon.config import Config, Overrides, load
from daemon.executors.base import OutputTooLong, UntrustedNode
from daemon.executors.child import ChildExecutor
from daemon.executors.host import HostExecutor
from daemon.executors.keeper import KeeperExecutor
from daemon.health import PROBE_OUTPUT_MAX, Health
from daemon.keeper.client import KeeperClient

pytestmark = pytest.mark.anyio
FACTS = "os=Linux\narch=x86_64\nkernel=6.1.0\nhostname=box\ncpus=2\n"


class ScriptedNode:
    """An executor as the prober sees it: `run` answers, or refuses the node, and remembers what it was asked."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.asked: list[tuple[str, float, int]] = []

    async def run(self, script: str, timeout_s: float, *, limit: int) -> str:
        self.asked.append((script, timeout_s, limit))
        if self.error is not None:
            raise self.error
        return FACTS

    async def aclose(self) -> None:
        pass


def _config(tmp_path: Path) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(f'[database]\npath = "{tmp_path / "jobs.db"}"\n'
                    '[nodes.box]\nhost = "192.0.2.1"\nuser = "jobs"\ninsecure_skip_host_key_check = true\n'
                    'docker_host = "unix:///run/other.sock"\n')
    return load(Overrides(config_path=str(path)), environ={})


async def _probe_box(tmp_path: Path, node: ScriptedNode) -> tuple[str, dict[str, object]]:
    config = _config(tmp_path)
    health = Health(config, service.prober(config, {"box": node}))  # type: ignore[dict-item]
    return (await health.probe_all())["box"]


async def test_a_remote_node_is_probed_through_its_executor_s_run_whatever_the_executor(tmp_path: Path) -> None:
    """Before: the prober asserted the executor was an SshExecutor (any other one left the node offline)."""
    node = ScriptedNode()
    status, caps = await _probe_box(tmp_path, node)
    assert (status, caps["hostname"]) == ("online", "box")
    [(script, _timeout, limit)] = node.asked
    assert script.startswith("DOCKER_HOST=unix:///run/other.sock; export DOCKER_HOST\n")
    assert limit == PROBE_OUTPUT_MAX


async def test_a_node_its_executor_distrusts_is_in_error_at_once_not_offline_after_misses(tmp_path: Path) -> None:
    status, caps = await _probe_box(tmp_path, ScriptedNode(UntrustedNode("host key of node box changed")))
    assert (status, caps["error"], caps["missed_probes"]) == ("error", "host key of node box changed", 0)


async def test_a_node_that_does_not_answer_misses_a_probe(tmp_path: Path) -> None:
    status, caps = await _probe_box(tmp_path, ScriptedNode(TimeoutError()))
    assert caps["missed_probes"] == 1 and status != "error"


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
