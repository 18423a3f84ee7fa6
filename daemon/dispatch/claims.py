"""Claiming within the limits: slots counted globally and per node, rows claimed for the nodes that can take them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from daemon.config import Config
from daemon.model import ClaimedJob
from daemon.store import Store


class NodeGate(Protocol):
    def can_claim(self, node_id: str) -> bool: ...


class Slots:
    """What the limits count: jobs whose process has not ended, in all and per node; and the nodes whose last claim
    was cut short by a limit (a slot freed there, or anywhere for the global limit, is worth a claim)."""

    def __init__(self, config: Config) -> None:
        self.used = 0
        self.per_node = dict.fromkeys(config.nodes, 0)
        self.backlog: set[str] = set()

    def reconfigure(self, config: Config) -> None:
        for node_id in config.nodes:
            self.per_node.setdefault(node_id, 0)

    def take(self, node_id: str) -> None:
        self.used += 1
        self.per_node[node_id] = self.per_node.get(node_id, 0) + 1

    def give_back(self, node_id: str) -> bool:
        """A job's process ended; True when rows were held back by a limit (a claim may find them now)."""
        self.used -= 1
        self.per_node[node_id] -= 1
        return bool(self.backlog)


class Claimer:
    """Claims the rows each node can take now, highest priority first (the store's order), and hands each to
    `start` (which takes its slot) before the next node's room is counted."""

    def __init__(self, store: Store, nodes: NodeGate, slots: Slots, worker_id: str,
                 start: Callable[[ClaimedJob], None]) -> None:
        self._store, self._nodes, self._slots = store, nodes, slots
        self._worker_id, self._start = worker_id, start

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
            if len(jobs) == free:
                self._slots.backlog.add(node.id)
            else:
                self._slots.backlog.discard(node.id)
            for job in jobs:
                self._start(job)
