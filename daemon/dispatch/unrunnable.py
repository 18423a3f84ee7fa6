"""Rows that can never run fail at once, with the reason: malformed, an unknown node or pool, a dependency cycle or
a dependency that did not complete, a node in error or offline past its queue_timeout, a pool no member of which
has the row's tool."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from daemon import logging as log
from daemon.config import Config, PoolConfig
from daemon.dispatch.placement import tools_of_pool
from daemon.model import NodeStatus, now_ms
from daemon.store import Store

logger = log.get("dispatch")


class NodeStates(Protocol):
    def error_of(self, node_id: str) -> str | None: ...

    def status_of(self, node_id: str) -> NodeStatus: ...

    def capabilities_of(self, node_id: str) -> Mapping[str, Any]: ...


class Unrunnable:
    def __init__(self, store: Store, nodes: NodeStates, worker_id: str) -> None:
        self._store, self._nodes, self._worker_id = store, nodes, worker_id
        self.dependents = False  # queued rows with depends_on exist: a job's end may unblock or fail them

    async def fail(self, config: Config, *, cycles: bool) -> None:
        """`cycles`: look for dependency cycles too (only another program's rows can make one)."""
        for job_id, reason in await self._store.fail_malformed():
            logger.warning("job.failed", job_id=job_id, reason=reason)
        for job_id, node_id in await self._store.fail_unknown_nodes(config.node_ids, tuple(config.pools)):
            logger.warning("job.failed", job_id=job_id, node=node_id, reason="unknown node")
        if cycles:
            for job_id, depends_on in await self._store.fail_dependency_cycles():
                logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency cycle")
        for job_id, depends_on in await self._store.fail_blocked_dependencies():
            logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency did not complete")
        await self._fail_for_node_health(config)
        for pool in config.pools.values():
            await self._fail_toolless(config, pool)
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

    async def _fail_toolless(self, config: Config, pool: PoolConfig) -> None:
        """A pool's rows whose tool no member has (as their probes found; nothing while one was never probed), here
        or at another daemon serving the pool."""
        tools = tools_of_pool(config, pool, self._nodes.capabilities_of)
        if tools is None:
            return
        error = (f"no member of pool {pool.id} ({', '.join(pool.members)}) has this job's tool (they have: "
                 f"{', '.join(sorted(tools)) or 'none'}); install it on a member, or name a node or pool that has it")
        for job_id, tool in await self._store.fail_toolless_pool_jobs(pool.id, sorted(tools), self._worker_id,
                                                                      error):
            logger.warning("job.failed", job_id=job_id, pool=pool.id, tool=tool, reason="no member has the tool")
