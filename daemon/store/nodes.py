"""The job store's part for nodes and pools: the nodes table's rows and heartbeats, the pools live daemons serve,
and the queue by node as the metrics and `nexus-jobd nodes` show it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.store.driver import Driver, Tx


class NodeRows:
    """Mixed into the job store: what the health checks, metrics and `nodes` read and write of nodes."""

    _driver: Driver

    async def upsert_nodes(self, nodes: Sequence[tuple[str, str, str | None]]) -> None:
        """(id, hostname, ip_address) of each configured node, in one transaction."""
        params = [{"id": i, "hostname": h, "ip_address": ip} for i, h, ip in nodes]
        await self._driver.transaction(lambda tx: tx.executemany("upsert_node", params))

    async def node_heartbeats(self, beats: Mapping[str, tuple[str, str]], served: Sequence[str]) -> list[str]:
        """node id -> (status, capabilities JSON); then nodes nobody serves go offline (their ids returned)."""
        params = [{"id": i, "status": s, "capabilities": c} for i, (s, c) in beats.items()]

        async def work(tx: Tx) -> list[str]:
            await tx.executemany("node_heartbeat", params)
            return (await tx.rows("unserved_nodes_offline", {"nodes": self._driver.array(served)})).column("id")

        return await self._driver.transaction(work)

    async def fail_node_jobs(self, node_id: str, error: str, *, queued_before: int | None = None) -> list[str]:
        """Fail the queued rows of a node that cannot take jobs: all, or those queued before `queued_before`."""
        rows = await self._driver.write("fail_node_jobs", {"node_id": node_id, "error": error, "before": queued_before})
        failed = rows.column("id")
        self._driver.touched(failed)
        return failed

    async def nodes_overview(self) -> list[dict[str, Any]]:
        return (await self._driver.read("nodes_overview")).dicts()

    async def pools_overview(self, configured: Mapping[str, Sequence[str]] | None = None) -> list[dict[str, Any]]:
        """Each pool a live daemon serves, or `configured` names (pool -> members): the daemons serving it, its
        queued rows, and its members as the nodes table has them (status, running jobs, heartbeat load)."""
        members: dict[str, list[str]] = {pool: list(ids) for pool, ids in (configured or {}).items()}
        daemons: dict[str, list[str]] = {}
        for worker_id, pools in (await self._driver.read("live_worker_pools")).each("id", "pools"):
            for pool, listed in _served_pools(pools).items():
                members.setdefault(pool, [])
                members[pool] += [node for node in listed if node not in members[pool]]
                daemons.setdefault(pool, []).append(str(worker_id))
        if not members:
            return []
        nodes = {row["id"]: row for row in await self.nodes_overview()}
        queue = await self.queue_by_node()
        return [{"id": pool, "daemons": daemons.get(pool, []), "queued": queue.get((pool, "queued"), 0),
                 "members": [_member(node, nodes.get(node)) for node in ids]}
                for pool, ids in sorted(members.items())]

    async def job_counts(self) -> dict[str, int]:
        """What waits, and what ended lately: queued, executing, finished_last_minute, finished_last_hour."""
        return (await self._driver.read("job_counts")).dicts()[0]

    async def queue_by_node(self) -> dict[tuple[str, str], int]:
        """(node id, status) -> rows, for `queued` and `executing`: the queue as the database has it (metrics)."""
        rows = await self._driver.read("queue_by_node")
        return {(str(node_id), str(status)): count for node_id, status, count in
                rows.each("node_id", "status", "jobs")}

    async def heartbeat_ages(self) -> dict[str, int]:
        """Node id -> ms since its last heartbeat by the database's clock, for nodes that had one (metrics)."""
        rows = await self._driver.read("heartbeat_ages")
        return {str(node_id): age for node_id, age in rows.each("id", "age_ms") if isinstance(age, int)}


def _served_pools(text: Any) -> dict[str, list[str]]:
    """jobd_workers.pools as pool -> members; what is not the daemon's JSON (another program's) counts as none."""
    try:
        pools = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        return {}
    if not isinstance(pools, dict):
        return {}
    return {str(pool): [m for m in entry.get("members", []) if isinstance(m, str)]
            for pool, entry in pools.items() if isinstance(entry, dict) and isinstance(entry.get("members"), list)}


def _member(node_id: str, row: Mapping[str, Any] | None) -> dict[str, Any]:
    """A pool member as `nodes` shows it: its status, running jobs and the one-minute load its heartbeat reported."""
    if row is None:
        return {"id": node_id, "status": "unknown", "running": 0, "load": None}
    try:
        caps = json.loads(row["capabilities"]) if isinstance(row["capabilities"], str) else {}
    except ValueError:
        caps = {}
    load = caps.get("load") if isinstance(caps, dict) else None
    return {"id": node_id, "status": row["status"], "running": row["running"],
            "load": load[0] if isinstance(load, list) and load and isinstance(load[0], int | float) else None}
