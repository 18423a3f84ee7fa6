"""Leases and crash recovery: each daemon registers itself and renews one lease for all its running jobs.

A daemon whose lease expired, or whose process is gone from this host, is dead: the first daemon to notice marks
it stopped (only one can). Its jobs on SSH nodes this daemon serves run on there: they are adopted (reattached).
So are its local jobs that this host's job keeper holds (they run on under the keeper). Of the others, what is
left of their process groups on this host is killed, and each job that may try again is re-queued, the rest
failed with the reason ("daemon on host H stopped answering" for a daemon on another host sharing a PostgreSQL
queue: what ran there cannot be reached from here; that daemon, if it comes back, kills it). Jobs a daemon
detached when it stopped (on_stop = "detach") are adopted the same way.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio

from daemon import logging as log
from daemon import procs
from daemon.model import OrphanedJob, Worker
from daemon.store import Store, survive_db_errors

logger = log.get("lease")
ORPHAN_ERROR = "daemon stopped while the job was running"
KEEPER_LOST_ERROR = ("daemon stopped while the job was running, and the job keeper that ran it is gone (killed, or "
                     "the host rebooted)")


def unreachable_host_error(host: str) -> str:
    return f"daemon on host {host} stopped answering"


@dataclass(frozen=True)
class Identity:
    """Who this daemon is, in terms another daemon on the same host can check."""

    worker_id: str
    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None

    @classmethod
    def of_this_process(cls, worker_id: str) -> Identity:
        pid = os.getpid()
        return cls(worker_id, socket.gethostname(), procs.boot_id(), pid, procs.start_time(pid))

    def same_boot(self, worker: Worker) -> bool:
        return worker.host == self.host and worker.boot_id is not None and worker.boot_id == self.boot_id


def why_dead(me: Identity, worker: Worker, ttl_ms: int) -> str | None:
    """The reason `worker` is dead, or None while it may be alive."""
    if worker.host == me.host and worker.boot_id != me.boot_id and worker.boot_id and me.boot_id:
        return "its host rebooted"
    if me.same_boot(worker) and not procs.is_alive(worker.pid, worker.pid_start):
        return f"its process {worker.pid} is gone"
    if worker.heartbeat_at + ttl_ms < worker.now:
        return f"its lease expired {(worker.now - worker.heartbeat_at) / 1000:.1f}s after its last heartbeat"
    return None


class Lease:
    def __init__(self, store: Store, me: Identity, *, ttl_ms: int, on_lost: Callable[[], None],
                 nodes: Sequence[str]) -> None:
        self._store = store
        self._nodes = nodes
        self.me = me
        self._ttl_ms = ttl_ms
        self._on_lost = on_lost
        self.on_requeued: Callable[[], None] = lambda: None  # the dispatcher claims what recovery re-queued
        self.on_db_error: Callable[[], None] = lambda: None  # a write failed (the metrics count it)
        # Takes a dead or detached daemon's running job over (its worker id, the job): True when it now runs here.
        # Only for jobs on `adoptable_nodes`, the SSH nodes this daemon serves. Set by the dispatcher.
        self.adopt: Callable[[str, OrphanedJob], Awaitable[bool]] | None = None
        self.adoptable_nodes: tuple[str, ...] = ()
        # The local node, when its jobs run under this host's keeper: which attempt keys the keeper holds.
        self.local_node: str | None = None
        self.keeper_holds: Callable[[list[str]], Awaitable[set[str]]] | None = None

    async def register(self) -> None:
        await self._store.register_worker(worker_id=self.me.worker_id, host=self.me.host, boot_id=self.me.boot_id,
                                          pid=self.me.pid, pid_start=self.me.pid_start, nodes=self._nodes)
        await self.recover()

    async def run(self) -> None:
        """Renew the lease and look for dead daemons, three times per lease period."""
        while True:
            await anyio.sleep(self._ttl_ms / 3000)
            # Missed for a whole ttl, others declare us dead.
            async with survive_db_errors("lease heartbeat", self.on_db_error):
                if not await self._store.heartbeat(self.me.worker_id):
                    logger.error("lease.lost", worker_id=self.me.worker_id,
                                 reason="another daemon declared this one dead and recovered its jobs")
                    self._on_lost()
                    return
                await self.recover()

    async def release(self, reason: str = "clean shutdown") -> None:
        """Mark this daemon stopped. Remote jobs it detached stay `executing` under its id: the next daemon (or
        any live one serving their node) adopts them."""
        # Unreleased, it expires: others recover nothing of ours.
        async with survive_db_errors("lease release", self.on_db_error):
            await self._store.stop_worker(self.me.worker_id, reason)

    async def recover(self) -> None:
        for worker in await self._store.other_workers(self.me.worker_id):
            reason = why_dead(self.me, worker, self._ttl_ms)
            if reason is not None and await self._store.stop_worker(worker.id, f"declared dead: {reason}"):
                await self._recover_jobs(worker, reason)
        if self.adopt is not None and self.adoptable_nodes:
            detached = await self._store.detached_jobs(self.adoptable_nodes)
            held = await self._held([job for *_, job in detached])
            for old_worker_id, host, boot_id, job in detached:
                same_boot = host == self.me.host and boot_id is not None and boot_id == self.me.boot_id
                if job.node_id == self.local_node and held is None:
                    continue  # the keeper did not answer: it may still run the job; the next round asks again
                if job.node_id != self.local_node or f"{job.id}:{job.attempt}" in (held or ()):
                    await self.adopt(old_worker_id, job)
                elif same_boot:  # detached on this host, but its keeper is gone: nothing runs it any more
                    await self._resolve(old_worker_id, job, KEEPER_LOST_ERROR, _kill_group(job))
                # else: another host's keeper holds it, for that host's daemons

    async def _recover_jobs(self, worker: Worker, reason: str) -> None:
        jobs = await self._store.orphaned_jobs(worker.id)
        logger.warning("lease.recovering", dead_worker=worker.id, reason=reason, jobs=len(jobs))
        held = await self._held(jobs) if self.me.same_boot(worker) else set()
        for job in jobs:
            local = job.node_id == self.local_node
            if local and held is None:
                continue  # the keeper did not answer: left `executing` under the stopped daemon, asked again later
            if self.adopt is not None and job.node_id in self.adoptable_nodes and (
                    not local or f"{job.id}:{job.attempt}" in (held or ())):
                # Adopted here, or left `executing` for another daemon (or the next one) serving the node to
                # adopt: never re-queued while it may still run there.
                await self.adopt(worker.id, job)
                continue
            await self._resolve(worker.id, job, self._orphan_error(worker, local), self._kill_leftovers(worker, job))

    def _orphan_error(self, worker: Worker, local: bool) -> str:
        if worker.host != self.me.host:  # a shared (PostgreSQL) queue: nobody here can reach what ran there
            return unreachable_host_error(worker.host)
        return KEEPER_LOST_ERROR if local and self.keeper_holds is not None else ORPHAN_ERROR

    async def _held(self, jobs: Sequence[OrphanedJob]) -> set[str] | None:
        """Which of these local jobs this host's keeper holds: none if there is no keeper (a keeper started now holds
        nothing), None if it could not be asked (it did not answer, no fd was free): not knowing is not "gone"."""
        keys = [f"{job.id}:{job.attempt}" for job in jobs if job.node_id == self.local_node]
        if not keys or self.keeper_holds is None:
            return set()
        try:
            return await self.keeper_holds(keys)
        except Exception as e:  # SpawnError: it did not answer, or none could be started; the rows wait
            logger.error("lease.keeper_unreachable", error=str(e), jobs=len(keys),
                         consequence="their rows stay executing until the keeper answers")
            return None

    async def _resolve(self, worker_id: str, job: OrphanedJob, error: str, killed: bool) -> None:
        requeue = isinstance(job.max_attempts, int) and job.attempt < job.max_attempts
        if await self._store.resolve_orphan(worker_id, job, requeue=requeue, error=error):
            logger.warning("job.recovered", job_id=job.id, dead_worker=worker_id, killed_leftovers=killed,
                           outcome="requeued" if requeue else "failed", error=error)
            if requeue:
                self.on_requeued()

    def _kill_leftovers(self, worker: Worker, job: OrphanedJob) -> bool:
        """Only on the dead daemon's own host and boot can its pids be trusted (and reached)."""
        return self.me.same_boot(worker) and _kill_group(job)


def _kill_group(job: OrphanedJob) -> bool:
    """What is left of the job's process group on this host (pid and start time checked); True if signalled."""
    return isinstance(job.pid, int) and job.pid > 1 and procs.kill_group(job.pid, job.pid_start)
