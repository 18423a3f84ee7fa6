"""Rows that can never run fail at once, with the reason: malformed, an unknown node, a dependency cycle or a
dependency that did not complete, a node in error or offline past its queue_timeout."""

from __future__ import annotations

from typing import Protocol

from daemon import logging as log
from daemon.config import Config
from daemon.model import NodeStatus, now_ms
from daemon.store import Store

logger = log.get("dispatch")


class NodeStates(Protocol):
    def error_of(self, node_id: str) -> str | None: ...

    def status_of(self, node_id: str) -> NodeStatus: ...


class Unrunnable:
    def __init__(self, store: Store, nodes: NodeStates) -> None:
        self._store, self._nodes = store, nodes
        self.dependents = False  # queued rows with depends_on exist: a job's end may unblock or fail them

    async def fail(self, config: Config, *, cycles: bool) -> None:
        """`cycles`: look for dependency cycles too (only another program's rows can make one)."""
        for job_id, reason in await self._store.fail_malformed():
            logger.warning("job.failed", job_id=job_id, reason=reason)
        for job_id, node_id in await self._store.fail_unknown_nodes(config.node_ids):
            logger.warning("job.failed", job_id=job_id, node=node_id, reason="unknown node")
        if cycles:
            for job_id, depends_on in await self._store.fail_dependency_cycles():
                logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency cycle")
        for job_id, depends_on in await self._store.fail_blocked_dependencies():
            logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency did not complete")
        await self._fail_for_node_health(config)
        self.dependents = await self._store.has_dependents()

    async def _fail_for_node_health(self, config: Config) -> None:
        """A node in `error` fails its queued jobs at once; an offline one after its queue_timeout, if it has one."""
        for node in config.nodes.values():
            error = self._nodes.error_of(node.id)
            before = None
            if error is not None:
                reason = f"node {node.id} is in error: {error}"
            elif node.queue_timeout_ms and self._nodes.status_of(node.id) in (NodeStatus.OFFLINE, NodeStatus.PENDING):
                reason = f"node {node.id} was offline for longer than its queue_timeout_ms ({node.queue_timeout_ms})"
                before = now_ms() - node.queue_timeout_ms
            else:
                continue
            for job_id in await self._store.fail_node_jobs(node.id, reason, queued_before=before):
                logger.warning("job.failed", job_id=job_id, node=node.id, reason=reason)
