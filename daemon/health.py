"""Node heartbeats: probe every node (the local one too), keep the `nodes` table current, and say which nodes
may take jobs. One missed probe is not enough to go offline (hysteresis); a refused host key is an error at once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from daemon import docker
from daemon import logging as log
from daemon.config import Config, NodeConfig
from daemon.model import NodeStatus
from daemon.tools import ulimit_script

logger = log.get("health")

# One POSIX sh line per fact, `name=value`; a missing tool prints nothing.
PROBE = r"""
echo "os=$(uname -s)"; echo "arch=$(uname -m)"; echo "kernel=$(uname -r)"; echo "hostname=$(uname -n)"
echo "cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc 2>/dev/null)"
echo "mem_total_kb=$(awk '/^MemTotal:/{print $2}' /proc/meminfo 2>/dev/null)"
echo "mem_available_kb=$(awk '/^MemAvailable:/{print $2}' /proc/meminfo 2>/dev/null)"
echo "load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
for t in bash git docker; do
  command -v "$t" >/dev/null 2>&1 && echo "$t=$("$t" --version 2>/dev/null | head -n 1)"
done
if command -v docker >/dev/null 2>&1; then
  if v=$(docker version --format '{{.Server.Version}}' 2>/dev/null); then echo "docker_engine=$v"
  else echo "docker_engine="; fi
fi
"""

TOOL_VERSIONS_TTL_S = 3600.0
PROBE_OUTPUT_MAX = 64 * 1024  # a probe prints about 500 bytes: a node printing more is not answering the probe


def probe_script(node: NodeConfig) -> str:
    """PROBE, and for a node with [limits] whether its `sh` may set them: a node that refuses them is in error
    (its jobs fail with the reason) rather than running jobs that each die with exit 125."""
    if not node.limits:
        return PROBE
    check = shlex.quote(ulimit_script(node.limits) + "; exit 0")
    return PROBE + f'if ! e=$(sh -c {check} 2>&1); then echo "limits_refused=$(echo "$e" | tr "\\n" " ")"; fi\n'

Prober = Callable[[NodeConfig, str], Awaitable[str]]  # (node, script) -> its stdout; raises when unreachable


class NodeRefused(Exception):
    """The node must not be used until someone fixes it (e.g. a changed host key): status `error`."""


class LocalProbe:
    """The local node's facts without starting a dozen processes every heartbeat (idle CPU matters on a phone):
    /proc and os for the live figures, the tools' versions asked once an hour, the Docker engine pinged."""

    def __init__(self) -> None:
        self._versions: dict[str, str] = {}
        self._versions_at = -TOOL_VERSIONS_TTL_S
        self._engine = docker.EngineProbe()

    async def text(self, node: NodeConfig) -> str:
        uname = os.uname()
        facts = {"os": uname.sysname, "arch": uname.machine, "kernel": uname.release, "hostname": uname.nodename,
                 "cpus": str(os.cpu_count() or ""), "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
        facts |= _meminfo()
        if time.monotonic() - self._versions_at > TOOL_VERSIONS_TTL_S:
            self._versions = await _tool_versions()
            self._versions_at = time.monotonic()
        facts |= self._versions
        if "docker" in self._versions:
            facts["docker_engine"] = "" if await self._engine.error(node.docker_host) else "answering"
        return "\n".join(f"{k}={v}" for k, v in facts.items())


def _meminfo() -> dict[str, str]:
    facts = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    facts[f"mem_{name[3:].lower()}_kb"] = rest.split()[0]
    except OSError:
        pass
    return facts


async def _tool_versions() -> dict[str, str]:
    versions = {}
    for tool in ("bash", "git", "docker"):
        if shutil.which(tool):
            with anyio.move_on_after(5):
                result = await anyio.run_process([tool, "--version"], check=False)
                versions[tool] = result.stdout.decode(errors="replace").partition("\n")[0].strip()
    return versions


# The facts PROBE prints; a node may print anything, so only these are kept, each cut to a short text.
FACTS = ("os", "arch", "kernel", "hostname", "cpus", "mem_total_kb", "mem_available_kb", "load", "bash", "git",
         "docker", "docker_engine", "limits_refused")
MAX_FACT_CHARS = 300


def parse_probe(text: str, rtt_ms: float) -> dict[str, Any]:
    """The capabilities JSON from a probe's output. Whatever a node prints, a fact that does not parse is null:
    never an exception, never a value JSON cannot hold (NaN)."""
    facts: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() in FACTS:
            facts[name.strip()] = value.strip()[:MAX_FACT_CHARS]
    caps: dict[str, Any] = {
        "tools": {t: facts[t] for t in ("bash", "git", "docker") if t in facts},
        "docker_engine": facts.get("docker_engine") or None,
        "os": facts.get("os"), "arch": facts.get("arch"), "kernel": facts.get("kernel"),
        "hostname": facts.get("hostname"), "rtt_ms": round(rtt_ms, 1),
    }
    if "limits_refused" in facts:
        caps["limits_refused"] = facts["limits_refused"] or "refused"
    for name in ("cpus", "mem_total_kb", "mem_available_kb"):
        caps[name] = _count(facts.get(name, ""))
    caps["load"] = _load_average(facts.get("load", ""))
    return caps


def _count(value: str) -> int | None:
    """A whole number as ASCII digits (str.isdigit also takes '²'), small enough for any JSON reader."""
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None


def _load_average(value: str) -> list[float] | None:
    parts = value.split()
    if len(parts) != 3:
        return None
    try:
        loads = [float(x) for x in parts]
    except ValueError:
        return None
    return loads if all(0 <= x < 1e9 for x in loads) else None  # NaN compares false: out too


def _first_status(node: NodeConfig) -> NodeStatus:
    """The local node is there; an SSH node is not claimed for before its first probe."""
    return NodeStatus.ONLINE if node.ssh is None else NodeStatus.PENDING


@dataclass
class NodeHealth:
    status: NodeStatus = NodeStatus.PENDING
    error: str | None = None
    missed: int = 0
    capabilities: dict[str, Any] = field(default_factory=dict)
    offline_since: float | None = None
    retry_at: float = 0.0  # monotonic: when a suspect node is worth a claim again


class Health:
    def __init__(self, config: Config, probe: Prober, changed: Callable[[], None] = lambda: None) -> None:
        """`changed`: a node's status changed (the dispatcher looks again at what it may claim, or must fail)."""
        self._config = config
        self._probe = probe
        self.nodes: dict[str, NodeHealth] = {node_id: NodeHealth(status=_first_status(node))
                                             for node_id, node in config.nodes.items()}
        self._changed = changed

    def reconfigure(self, config: Config) -> None:
        self._config = config
        for node_id, node in config.nodes.items():
            self.nodes.setdefault(node_id, NodeHealth(status=_first_status(node)))

    def can_claim(self, node_id: str) -> bool:
        state = self.nodes.get(node_id)
        if state is None:
            return False
        if state.status == NodeStatus.SUSPECT:
            return time.monotonic() >= state.retry_at
        return state.status == NodeStatus.ONLINE

    def unreachable(self, node_id: str, error: str, retry_in_s: float) -> None:
        """A job could not be started there because the node did not answer: its other rows wait too (each would
        fail the same way) until `retry_in_s` has passed or a probe reaches it, whichever comes first."""
        state = self.nodes.get(node_id)
        if state is None or state.status not in (NodeStatus.ONLINE, NodeStatus.SUSPECT):
            return
        if state.status == NodeStatus.ONLINE:
            logger.warning("node.status", node=node_id, status=NodeStatus.SUSPECT, was=NodeStatus.ONLINE, error=error,
                           retry_in_s=round(retry_in_s, 1))
        state.status, state.error = NodeStatus.SUSPECT, error
        state.retry_at = time.monotonic() + retry_in_s

    def status_of(self, node_id: str) -> NodeStatus:
        state = self.nodes.get(node_id)
        return state.status if state is not None else NodeStatus.PENDING

    def capabilities_of(self, node_id: str) -> Mapping[str, Any]:
        """What the node's last probe found (empty before one)."""
        state = self.nodes.get(node_id)
        return state.capabilities if state is not None else {}

    def error_of(self, node_id: str) -> str | None:
        state = self.nodes.get(node_id)
        return state.error if state is not None and state.status == NodeStatus.ERROR else None

    async def probe_all(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Probe every node at once; node id -> (status for the table, capabilities JSON)."""
        results: dict[str, tuple[str, dict[str, Any]]] = {}

        async def one(node: NodeConfig) -> None:
            results[node.id] = await self._probe_one(node)

        async with anyio.create_task_group() as tg:
            for node in self._config.nodes.values():
                tg.start_soon(one, node)
        return results

    async def _probe_one(self, node: NodeConfig) -> tuple[str, dict[str, Any]]:
        state = self.nodes.setdefault(node.id, NodeHealth())
        before = state.status
        started = time.monotonic()
        try:
            with anyio.fail_after(max(5.0, self._config.heartbeat_interval_ms / 1000)):
                text = await self._probe(node, probe_script(node))
            capabilities = parse_probe(text, (time.monotonic() - started) * 1000)  # in the try: never a crash
        except NodeRefused as e:
            state.status, state.error = NodeStatus.ERROR, str(e)
        except Exception as e:  # unreachable: offline only after `offline_after` misses in a row
            state.missed += 1
            state.error = str(e) or type(e).__name__
            if state.missed >= node.offline_after:
                state.status = NodeStatus.OFFLINE
        else:
            state.capabilities = capabilities
            refused = state.capabilities.pop("limits_refused", None)
            if refused is None:
                state.status, state.error, state.missed = NodeStatus.ONLINE, None, 0
            else:
                state.status, state.missed = NodeStatus.ERROR, 0
                state.error = (f"the node refuses its [nodes.{node.id}.limits] ({refused}); lower them to what "
                               "its hard limits allow (`ulimit -Ha` there)")
        if state.status == NodeStatus.OFFLINE and state.offline_since is None:
            state.offline_since = time.monotonic()
        elif state.status != NodeStatus.OFFLINE:
            state.offline_since = None
        if state.status != before:
            # Back online is news, not trouble.
            level = logger.info if state.status == NodeStatus.ONLINE else logger.warning
            level("node.status", node=node.id, status=state.status, was=before, error=state.error)
            self._changed()
        caps = dict(state.capabilities)
        if state.error:
            caps["error"] = state.error
        caps["missed_probes"] = state.missed
        table_status = state.status.table_value
        return table_status, caps


def capabilities_json(caps: Mapping[str, Any]) -> str:
    return json.dumps(caps, sort_keys=True)
