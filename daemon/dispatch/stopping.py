"""The stop policy: detach (leave jobs that outlive the daemon to the next one), drain (wait for the rest, then stop
them after the grace), or abandon (after a lost lease: another daemon follows our detachable jobs now)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping

import anyio

from daemon import logging as log
from daemon.config import Config
from daemon.executors.base import Executor
from daemon.model import StopReason
from daemon.runner import RunningJob

logger = log.get("dispatch")
DETACH_START_WAIT_S = 5.0  # on a detaching stop, jobs still starting get this long to be started


class StopPolicy:
    def __init__(self, running: dict[tuple[str, int], RunningJob], executors: Mapping[str, Executor],
                 request_stop: Callable[[RunningJob, StopReason], None], flush: Callable[[], Awaitable[None]],
                 ring: Callable[[], None]) -> None:
        self._running, self._executors = running, executors
        self._request_stop, self._flush, self._ring = request_stop, flush, ring
        self.stopping = False  # no more adoptions: a job taken over now would only be stopped with the rest
        self.abandon = False  # the lease was lost
        self.detached = 0  # jobs left running for the next daemon

    def stop_all(self, config: Config, reason: StopReason) -> None:
        """Stop every running job; after a lost lease, remote jobs are left alone: the daemon that declared us dead
        adopted them. Local jobs under the keeper are stopped: if another daemon of this host adopted one, the
        keeper gave it to that daemon (TAKEN) and ignores our signal; if none did (it was recovered from another
        host, which cannot reach our keeper), nobody else will stop it."""
        if reason == StopReason.LEASE_LOST:
            self.abandon = True
        for job in list(self._running.values()):
            if not (self.abandon and self._left_running(config, job)):
                self._request_stop(job, reason)
        self._ring()

    async def drain(self, config: Config, look: Callable[[], Awaitable[None]],
                    wait: Callable[[float | None], Awaitable[None]]) -> None:
        """Stop claiming but keep noticing cancels (`look`); after `shutdown_grace`, TERM/KILL what still runs.
        With on_stop = "detach" (or a lost lease), detachable jobs (remote, or local under the keeper) are first
        left to run on (see detach)."""
        self.stopping = True
        if config.on_stop == "detach" or self.abandon:
            await self._detach(config)
        if not self._running:
            return
        grace_s = config.shutdown_grace_ms / 1000
        logger.info("dispatch.draining", running=len(self._running), grace_s=grace_s)
        deadline = time.monotonic() + grace_s
        stopped = False
        while self._running:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not stopped:
                stopped = True
                self.stop_all(config, StopReason.SHUTDOWN)
            await look()
            await wait(remaining if remaining > 0 else None)

    def _left_running(self, config: Config, job: RunningJob) -> bool:
        """A job that runs on without this daemon: detached at a stop, or abandoned after a lost lease."""
        if job.process is None or not job.process.detachable:
            return False
        return not self.abandon or job.node_id != config.local_node

    async def _detach(self, config: Config) -> None:
        """Leave detachable jobs running for the next daemon: wait a little for those still starting, record the
        output read so far, and stop following them (their rows stay `executing` under this daemon's id; the next
        daemon, or any live one serving the node, adopts them)."""
        for _ in range(int(DETACH_START_WAIT_S / 0.05)):
            if not any(self._starting_remote(job) for job in self._running.values()):
                break
            await anyio.sleep(0.05)
        leaving = [job for job in self._running.values() if self._left_running(config, job) and job.holds_slot]
        if not leaving:
            return
        if not self.abandon:
            with anyio.CancelScope(shield=True):
                await self._flush()
        for job in leaving:
            job.end_timers()
            job.scope.cancel()
        self.detached = len(leaving)
        logger.info("dispatch.detached", jobs=len(leaving), job_ids=sorted(j.claim.job_id for j in leaving))
        for _ in range(500):  # their tasks end at the next turn of the loop
            if not any(job in self._running.values() for job in leaving):
                break
            await anyio.sleep(0.01)

    def _starting_remote(self, job: RunningJob) -> bool:
        executor = self._executors.get(job.node_id)
        return job.process is None and executor is not None and executor.can_reattach and job.holds_slot
