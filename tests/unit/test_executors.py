"""The executors' one interface as the prober uses it: probing a node through whatever executor runs its jobs
(the daemon's own scripts on this host, under real processes, are in tests/integration/test_host_scripts.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import service
from daemon.config import Config, Overrides, load
from daemon.executors.base import UntrustedNode
from daemon.health import PROBE_OUTPUT_MAX, Health

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
