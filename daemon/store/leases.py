"""The job store's part for leases and recovery: daemons registering and renewing their lease, a dead or detached
daemon's jobs re-queued, failed or adopted by another, each a compare-and-set on the claim."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.model import AdoptedJob, ClaimedJob, JobStatus, OrphanedJob, Worker
from daemon.store.driver import Driver, values


class LeaseRows:
    """Mixed into the job store: the rows of jobd_workers, and the running jobs of daemons that stopped."""

    _driver: Driver

    async def register_worker(self, *, worker_id: str, host: str, boot_id: str | None, pid: int,
                              pid_start: int | None, nodes: Sequence[str],
                              pools: Mapping[str, Any] | None = None) -> None:
        """`pools`: pool -> {members, tools} this daemon serves (see set_worker_pools)."""
        await self._driver.write("register_worker", {"id": worker_id, "host": host, "boot_id": boot_id, "pid": pid,
                                                     "pid_start": pid_start, "nodes": json.dumps(list(nodes)),
                                                     "pools": _pools_json(pools)})

    async def set_worker_pools(self, worker_id: str, pools: Mapping[str, Any]) -> None:
        """The pools this daemon serves now, each with its members and the tools they have: other daemons read it
        to tell a pool's name from an unknown node, and to fail a row no member anywhere has the tool for."""
        await self._driver.write_count("worker_pools", {"id": worker_id, "pools": _pools_json(pools)})

    async def heartbeat(self, worker_id: str) -> bool:
        """Renew our lease; False means another daemon declared us dead and took our jobs."""
        return bool(await self._driver.write("heartbeat", {"id": worker_id}))

    async def other_workers(self, worker_id: str) -> list[Worker]:
        return values(Worker, await self._driver.read("other_workers", {"id": worker_id}))

    async def stop_worker(self, worker_id: str, reason: str) -> bool:
        """Mark a worker stopped; True for the one caller that did it (and so recovers its jobs)."""
        return bool(await self._driver.write("stop_worker", {"id": worker_id, "reason": reason}))

    async def orphaned_jobs(self, worker_id: str) -> list[OrphanedJob]:
        return values(OrphanedJob, await self._driver.read("orphaned_jobs", {"worker_id": worker_id}))

    async def resolve_orphan(self, worker_id: str, job: OrphanedJob, *, requeue: bool, error: str) -> bool:
        """Re-queue or fail a dead daemon's job: a compare-and-set on its claim, so a late finisher cannot win."""
        params = {"id": job.id, "worker_id": worker_id, "attempt": job.attempt, "error": error}
        done = await self._driver.write_count("requeue_orphan" if requeue else "fail_orphan", params) == 1
        self._driver.touched([job.id])
        return done

    async def adopt(self, old_worker_id: str, job: OrphanedJob, worker_id: str) -> AdoptedJob | None:
        """Take a dead or detached daemon's running job over for the same attempt; None if another daemon did,
        or it ended meanwhile. What it recorded comes along: its output (text only) and byte counts."""
        rows = await self._driver.write("adopt_job", {"id": job.id, "old_worker_id": old_worker_id,
                                                      "attempt": job.attempt, "worker_id": worker_id})
        self._driver.touched([job.id])
        if not rows:
            return None
        status, stdout, stderr, stdout_bytes, stderr_bytes = rows.pick(
            "status", "stdout", "stderr", "stdout_bytes", "stderr_bytes")(rows[0])
        return AdoptedJob(values(ClaimedJob, rows)[0], status == JobStatus.CANCELLED, _text_or_none(stdout),
                          _text_or_none(stderr), _count(stdout_bytes), _count(stderr_bytes))

    async def detached_jobs(self, node_ids: Sequence[str]) -> list[tuple[str, str, str | None, OrphanedJob]]:
        """(its stopped daemon, that daemon's host and boot id, job) for each unfinished job on these nodes whose
        daemon stopped without ending it."""
        rows = await self._driver.read("detached_jobs", {"nodes": self._driver.array(node_ids)})
        if not rows:
            return []
        daemon = rows.pick("worker_id", "host", "boot_id")
        return [(*daemon(row), job) for row, job in zip(rows, values(OrphanedJob, rows), strict=True)]

    async def finished_attempts(self, node_id: str) -> list[tuple[str, int]]:
        """(job id, attempt) of every attempt of this node's rows that can no longer be running: all but a row's
        latest one, and that one too once the row is final or back in the queue."""
        rows = await self._driver.read("attempts_on_node", {"node_id": node_id})
        return [(job_id, n) for job_id, attempt, running in rows.each("id", "attempt", "running")
                if isinstance(attempt, int) for n in range(1, attempt + (0 if running else 1))]

    async def live_daemons_serving(self, node_id: Any, *, lease_ttl_ms: int) -> int:
        """How many daemons are alive (not stopped, heartbeat within the lease ttl) and serve this node."""
        rows = await self._driver.read("live_daemons_serving", {"node_id": self._driver.key(node_id),
                                                                "ttl_ms": lease_ttl_ms})
        return int(rows.first("daemons"))


def _pools_json(pools: Mapping[str, Any] | None) -> str | None:
    return json.dumps(pools, sort_keys=True) if pools else None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
