"""Claiming within the limits: slots counted globally, per node and per pool, rows claimed for the nodes that can
take them, and a pool's rows placed on its members (daemon.dispatch.placement) as they are claimed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from daemon.config import Config, PoolConfig
from daemon.dispatch.placement import Member, load_per_cpu, place, tools_now
from daemon.model import ClaimedJob, NodeStatus, PoolRow
from daemon.store import Store


class NodeGate(Protocol):
    def can_claim(self, node_id: str) -> bool: ...

    def status_of(self, node_id: str) -> NodeStatus: ...

    def capabilities_of(self, node_id: str) -> Mapping[str, Any]: ...


class Slots:
    """What the limits count: jobs whose process has not ended, in all, per node and per pool; and the nodes and
    pools whose last claim was cut short by a limit (a slot freed there, or anywhere for the global limit, is worth
    a claim)."""

    def __init__(self, config: Config) -> None:
        self.used = 0
        self.per_node = dict.fromkeys(config.nodes, 0)
        self.per_pool = dict.fromkeys(config.pools, 0)
        self.backlog: set[str] = set()

    def reconfigure(self, config: Config) -> None:
        for node_id in config.nodes:
            self.per_node.setdefault(node_id, 0)
        for pool_id in config.pools:
            self.per_pool.setdefault(pool_id, 0)

    def take(self, node_id: str, pool: str | None = None) -> None:
        self.used += 1
        self.per_node[node_id] = self.per_node.get(node_id, 0) + 1
        if pool is not None:
            self.per_pool[pool] = self.per_pool.get(pool, 0) + 1

    def give_back(self, node_id: str, pool: str | None = None) -> bool:
        """A job's process ended; True when rows were held back by a limit (a claim may find them now)."""
        self.used -= 1
        self.per_node[node_id] -= 1
        if pool is not None:
            self.per_pool[pool] -= 1
        return bool(self.backlog)


class Claimer:
    """Claims the rows each node can take now, highest priority first (the store's order), and hands each to
    `start` (which takes its slot) before the next node's room is counted; then each pool's rows, placed."""

    def __init__(self, store: Store, nodes: NodeGate, slots: Slots, worker_id: str,
                 start: Callable[[ClaimedJob], None]) -> None:
        self._store, self._nodes, self._slots = store, nodes, slots
        self._worker_id, self._start = worker_id, start
        self._turns: dict[str, int] = {}  # per pool: where ties between equally loaded members start

    async def claim(self, config: Config) -> None:
        """A database error propagates: the claim may have committed with its answer lost (the caller re-queues
        rows claimed under our id that we do not run, once the database answers again)."""
        for node in config.nodes.values():
            if not self._nodes.can_claim(node.id):
                continue  # offline or in error: its rows wait (or fail: Unrunnable)
            free = min(node.max_concurrent - self._slots.per_node.get(node.id, 0),
                       config.max_concurrent - self._slots.used)
            if free <= 0:
                self._slots.backlog.add(node.id)
                continue
            jobs = await self._store.claim(node.id, free, self._worker_id)
            self._held_back(node.id, len(jobs) == free)
            for job in jobs:
                self._start(job)
        for pool in config.pools.values():
            await self._claim_pool(config, pool)

    def _held_back(self, name: str, held: bool) -> None:
        if held:
            self._slots.backlog.add(name)
        else:
            self._slots.backlog.discard(name)

    async def _claim_pool(self, config: Config, pool: PoolConfig) -> None:
        """The pool's rows that its members can take now, each on the member placement chose."""
        room = config.max_concurrent - self._slots.used
        if pool.max_concurrent is not None:
            room = min(room, pool.max_concurrent - self._slots.per_pool.get(pool.id, 0))
        members = self._members(config, pool)
        free = min(room, sum(member.free for member in members))
        if free <= 0:
            # Full (a slot freed is worth a claim), or no member online (a node's status change wakes us).
            self._held_back(pool.id, room <= 0 or bool(members))
            return
        tools = sorted(set().union(*(member.tools for member in members if member.free > 0)))
        turn = self._turns.get(pool.id, 0)
        left = 0  # rows read but not placed (the last try's, if the backend retried the transaction)

        def placing(rows: list[PoolRow]) -> list[tuple[Any, str]]:
            nonlocal left
            placed = place(rows, [dataclasses.replace(m) for m in members], free, turn)  # fresh: a retry starts over
            left = len(rows) - len(placed)
            return placed

        jobs = await self._store.claim_pool(pool.id, tools, free, self._worker_id, placing)
        self._turns[pool.id] = turn + len(jobs)
        # Held back: rows left for want of room, or a full member whose freed slot may take a row of its tool.
        self._held_back(pool.id, len(jobs) == free or left > 0 or any(m.free == 0 for m in members))
        for job in jobs:
            self._start(job)

    def _members(self, config: Config, pool: PoolConfig) -> list[Member]:
        """The pool's members this daemon may place on now: online (not suspect, offline or in error), with their
        room (zero when full), load and the tools they can run now."""
        members = []
        for node_id in pool.members:
            node = config.nodes.get(node_id)
            if node is None or self._nodes.status_of(node_id) != NodeStatus.ONLINE:
                continue
            caps = self._nodes.capabilities_of(node_id)
            running = self._slots.per_node.get(node_id, 0)
            members.append(Member(node_id, max(0, node.max_concurrent - running), running, node.max_concurrent,
                                  load_per_cpu(caps), tools_now(caps) & frozenset(node.tools)))
        return members
