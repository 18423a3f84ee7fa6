"""Placement: which member of a pool runs each of its queued rows, chosen as they are claimed. Pure: the claimer
gives it the members' room and load and the rows in the claim's order; it answers row -> member."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.config import Config, PoolConfig
from daemon.model import PoolRow

TOOLS = ("bash", "git", "docker")


@dataclass
class Member:
    """A pool member this daemon may place on now: its free slots, its running jobs against its limit, the load
    its heartbeat reported per CPU (None: not known), and the tools it can run now."""

    id: str
    free: int
    running: int
    limit: int
    load: float | None = None
    tools: frozenset[str] = field(default_factory=frozenset)

    def ratio(self) -> float:
        return self.running / self.limit if self.limit > 0 else float("inf")


def tools_now(capabilities: Mapping[str, Any]) -> frozenset[str]:
    """The tools a node can run now, from its heartbeat's capabilities: a tool its probe found, docker only while
    the engine answers. Before a first probe (no `tools` fact) bash only: only the local node is online then."""
    tools = capabilities.get("tools")
    if not isinstance(tools, Mapping):
        return frozenset({"bash"})
    have = {tool for tool in ("bash", "git") if tool in tools}
    if "docker" in tools and capabilities.get("docker_engine"):
        have.add("docker")
    return frozenset(have)


def tools_ever(capabilities: Mapping[str, Any]) -> frozenset[str] | None:
    """The tools a node has installed (docker even while its engine is down: it may answer later); None before a
    first probe, when nothing can be said."""
    tools = capabilities.get("tools")
    if not isinstance(tools, Mapping):
        return None
    return frozenset(tool for tool in TOOLS if tool in tools)


def load_per_cpu(capabilities: Mapping[str, Any]) -> float | None:
    """The heartbeat's one-minute load average over the node's CPUs, or None when it did not report them."""
    load, cpus = capabilities.get("load"), capabilities.get("cpus")
    if not isinstance(load, list) or not load or not isinstance(load[0], int | float):
        return None
    return float(load[0]) / cpus if isinstance(cpus, int) and cpus > 0 else float(load[0])


def place(rows: Iterable[PoolRow], members: Sequence[Member], room: int, turn: int = 0) -> list[tuple[Any, str]]:
    """(row seq, member id) for each row that a member can take now, at most `room` (the pool's and the daemon's
    free slots). Each row goes to the least loaded member that can run its tool: running jobs against its limit,
    then its heartbeat load, ties in turn from `turn`; a row tried before avoids the member its last attempt ran on
    while another can take it. A row no member can take now is left out (it stays queued)."""
    order = {member.id: (i - turn) % len(members) for i, member in enumerate(members)} if members else {}
    placed: list[tuple[Any, str]] = []
    for row in rows:
        if len(placed) >= room:
            break
        able = [m for m in members if m.free > 0 and row.tool in m.tools]
        if not able:
            continue
        best = min(able, key=lambda m: (m.id == row.last_node, m.ratio(),
                                        m.load if m.load is not None else 0.0, order[m.id]))
        best.free -= 1
        best.running += 1
        placed.append((row.seq, best.id))
    return placed


def tools_of_pool(config: Config, pool: PoolConfig,
                  capabilities: Callable[[str], Mapping[str, Any]]) -> frozenset[str] | None:
    """The tools some member may run (its [nodes.X] tools) and has installed; None while a member was never probed
    (it may have any of them)."""
    found: set[str] = set()
    for member in pool.members:
        tools = tools_ever(capabilities(member))
        if tools is None:
            return None
        node = config.nodes.get(member)
        found |= tools & set(node.tools if node is not None else ())
    return frozenset(found)


def pools_served(config: Config, capabilities: Callable[[str], Mapping[str, Any]]) -> dict[str, Any]:
    """What this daemon tells other daemons of its pools (jobd_workers.pools): each one's members, and the tools
    they have (all of them while one was never probed: it may have any)."""
    served = {}
    for pool in config.pools.values():
        tools = tools_of_pool(config, pool, capabilities)
        served[pool.id] = {"members": list(pool.members), "tools": sorted(TOOLS if tools is None else tools)}
    return served
