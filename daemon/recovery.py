"""What becomes of a dead daemon's jobs, and of those a daemon detached when it stopped.

A daemon whose lease expired, or whose process is gone from this host, is dead: the first daemon to notice marks
it stopped (only one can). Its jobs that still run where they ran (an SSH node this daemon serves, or this host's
job keeper) are adopted: reattached. Of the others, what is left of their process groups on this host is killed,
and each job is re-queued if outcome says it may try again, failed with the reason otherwise ("daemon on host H
stopped answering" for a daemon on another host sharing a PostgreSQL queue: what ran there cannot be reached from
here; that daemon, if it comes back, kills it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from daemon import logging as log
from daemon import outcome, procs
from daemon.executors.base import Executor
from daemon.lease import Identity
from daemon.model import OrphanedJob, Worker
from daemon.store import Store

logger = log.get("lease")
ORPHAN_ERROR = "daemon stopped while the job was running"
KEEPER_LOST_ERROR = ("daemon stopped while the job was running, and the job keeper that ran it is gone (killed, or "
                     "the host rebooted)")
Adopt = Callable[[str, OrphanedJob], Awaitable[bool]]


def unreachable_host_error(host: str) -> str:
    return f"daemon on host {host} stopped answering"


def why_dead(me: Identity, worker: Worker, ttl_ms: int) -> str | None:
    """The reason `worker` is dead, or None while it may be alive."""
    if worker.host == me.host and worker.boot_id != me.boot_id and worker.boot_id and me.boot_id:
        return "its host rebooted"
    if me.same_boot(worker) and not procs.is_alive(worker.pid, worker.pid_start):
        return f"its process {worker.pid} is gone"
    if worker.heartbeat_at + ttl_ms < worker.now:
        return f"its lease expired {(worker.now - worker.heartbeat_at) / 1000:.1f}s after its last heartbeat"
    return None


class Recovery:
    def __init__(self, store: Store, me: Identity, *, ttl_ms: int, executors: Mapping[str, Executor],
                 local_node: str, adopt: Adopt, on_requeued: Callable[[], None]) -> None:
        """`adopt`: takes a dead or detached daemon's running job over (its worker id, the job): True when it now
        runs here; asked only for jobs on the nodes whose executor can reattach. `on_requeued`: rows went back to
        the queue."""
        self._store, self._me, self._ttl_ms, self._adopt, self._on_requeued = store, me, ttl_ms, adopt, on_requeued
        self._adoptable = tuple(node for node, executor in executors.items() if executor.can_reattach)
        self._local_node = local_node
        local = executors.get(local_node)
        # This host's keeper (when local jobs run under one): which attempt keys it holds.
        self._keeper = local if local is not None and local.can_reattach else None

    async def recover(self) -> None:
        for worker in await self._store.other_workers(self._me.worker_id):
            reason = why_dead(self._me, worker, self._ttl_ms)
            if reason is not None and await self._store.stop_worker(worker.id, f"declared dead: {reason}"):
                await self._recover_jobs(worker, reason)
        if self._adoptable:
            await self._adopt_detached()

    async def _adopt_detached(self) -> None:
        detached = await self._store.detached_jobs(self._adoptable)
        held = await self._held([job for *_, job in detached])
        for old_worker_id, host, boot_id, job in detached:
            same_boot = host == self._me.host and boot_id is not None and boot_id == self._me.boot_id
            if job.node_id == self._local_node and held is None:
                continue  # the keeper did not answer: it may still run the job; the next round asks again
            if job.node_id != self._local_node or f"{job.id}:{job.attempt}" in (held or ()):
                await self._adopt(old_worker_id, job)
            elif same_boot:  # detached on this host, but its keeper is gone: nothing runs it any more
                await self._resolve(old_worker_id, job, KEEPER_LOST_ERROR, _kill_group(job))
            # else: another host's keeper holds it, for that host's daemons

    async def _recover_jobs(self, worker: Worker, reason: str) -> None:
        jobs = await self._store.orphaned_jobs(worker.id)
        logger.warning("lease.recovering", dead_worker=worker.id, reason=reason, jobs=len(jobs))
        held = await self._held(jobs) if self._me.same_boot(worker) else set()
        for job in jobs:
            local = job.node_id == self._local_node
            if local and held is None:
                continue  # the keeper did not answer: left `executing` under the stopped daemon, asked again later
            if job.node_id in self._adoptable and (not local or f"{job.id}:{job.attempt}" in (held or ())):
                # Adopted here, or left `executing` for another daemon (or the next one) serving the node to
                # adopt: never re-queued while it may still run there.
                await self._adopt(worker.id, job)
                continue
            await self._resolve(worker.id, job, self._orphan_error(worker, local), self._kill_leftovers(worker, job))

    def _orphan_error(self, worker: Worker, local: bool) -> str:
        if worker.host != self._me.host:  # a shared (PostgreSQL) queue: nobody here can reach what ran there
            return unreachable_host_error(worker.host)
        return KEEPER_LOST_ERROR if local and self._keeper is not None else ORPHAN_ERROR

    async def _held(self, jobs: Sequence[OrphanedJob]) -> set[str] | None:
        """Which of these local jobs this host's keeper holds: none if there is no keeper (a keeper started now holds
        nothing), None if it could not be asked (it did not answer, no fd was free): not knowing is not "gone"."""
        keys = [f"{job.id}:{job.attempt}" for job in jobs if job.node_id == self._local_node]
        if not keys or self._keeper is None:
            return set()
        try:
            return await self._keeper.holds(keys)
        except Exception as e:  # SpawnError: it did not answer, or none could be started; the rows wait
            logger.error("lease.keeper_unreachable", error=str(e), jobs=len(keys),
                         consequence="their rows stay executing until the keeper answers")
            return None

    async def _resolve(self, worker_id: str, job: OrphanedJob, error: str, killed: bool) -> None:
        requeue = outcome.may_retry(job.attempt, job.max_attempts)
        if await self._store.resolve_orphan(worker_id, job, requeue=requeue, error=error):
            logger.warning("job.recovered", job_id=job.id, dead_worker=worker_id, killed_leftovers=killed,
                           outcome="requeued" if requeue else "failed", error=error)
            if requeue:
                self._on_requeued()

    def _kill_leftovers(self, worker: Worker, job: OrphanedJob) -> bool:
        """Only on the dead daemon's own host and boot can its pids be trusted (and reached)."""
        return self._me.same_boot(worker) and _kill_group(job)


def _kill_group(job: OrphanedJob) -> bool:
    """What is left of the job's process group on this host (pid and start time checked); True if signalled."""
    return isinstance(job.pid, int) and job.pid > 1 and procs.kill_group(job.pid, job.pid_start)
