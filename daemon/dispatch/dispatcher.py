"""The dispatcher's loop: take the reasons it was woken for, do the duties they call for (notice cancels, fail rows
that can never run, claim within the limits, look for the next due time), run each claimed job to its end, sleep.

Its parts: Claimer and Slots (claims), Unrunnable, Recorder (finishes and output), StopPolicy (drain, detach,
abandon), chores (start-up kills and sweeps); the change source of the store wakes it when the queue may have
changed, Health when a node did, recovery when it put rows back, the jobs when one ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio
from anyio.abc import TaskGroup

from daemon import logging as log
from daemon import output
from daemon.config import Config
from daemon.dispatch import chores
from daemon.dispatch.claims import Claimer, NodeGate, Slots
from daemon.dispatch.recorder import Finished, Recorder
from daemon.dispatch.stopping import StopPolicy
from daemon.dispatch.unrunnable import NodeStates, Unrunnable
from daemon.dispatch.wakes import CLAIM, FAIL_UNRUNNABLE, FIND_CYCLES, NOTICE_CANCELS, RESCHEDULE, Wake, Wakes
from daemon.errors import DatabaseRewritten
from daemon.executors.base import Executor
from daemon.hooks import Activity, Hooks
from daemon.model import ClaimedJob, JobResult, JobStatus, OrphanedJob, Quarantine, StopReason, now_ms
from daemon.runner import JobRunner, RunningJob
from daemon.store import DbError, Store

logger = log.get("dispatch")
UNKNOWN_CLAIM_ERROR = "claimed as the connection to the database was lost; never started, queued again"
RunFn = Callable[[ClaimedJob, RunningJob], Awaitable[JobResult]]


class Nodes(NodeGate, NodeStates, Protocol):
    """What the dispatcher asks of, and tells, node health."""

    def unreachable(self, node_id: str, error: str, retry_in_s: float) -> None: ...


class Dispatcher:
    def __init__(self, config: Config, store: Store, executors: Mapping[str, Executor], nodes: Nodes,
                 wakes: Wakes, worker: Mapping[str, Any], *, hooks: Hooks | None = None,
                 activity: Activity | None = None, on_rewritten: Callable[[Quarantine], None] = lambda _: None) -> None:
        """`worker`: this daemon's lease identity (its `worker_id`, host, boot, pid), as a report keeps it.
        `activity`: told when the first job starts and when the last one has ended (the wake lock)."""
        self._config, self._store, self._executors, self._wakes = config, store, executors, wakes
        self._nodes = nodes
        self.worker_id = str(worker["worker_id"])
        self._hooks = hooks or Hooks()
        self._activity = activity or Activity()
        self._working = 0  # jobs between the start of their task and the end of their process
        # Claimed and not yet recorded as finished, by (job id, attempt): a row another program re-queued while it
        # ran may be claimed again before the first attempt has ended.
        self.running: dict[tuple[str, int], RunningJob] = {}
        self._slots = Slots(config)
        self._recorder = Recorder(config, store, self.running, JobRunner.process_ref, self._hooks, worker,
                                  self._recorded, on_rewritten)
        self._runner = JobRunner(config, executors, self._recorder.output_changed)
        self._claimer = Claimer(store, nodes, self._slots, self.worker_id, self._start)
        self._unrunnable = Unrunnable(store, nodes, self.worker_id)
        self._stop = StopPolicy(self.running, executors, self._runner.request_stop, self._recorder.flush_once,
                                wakes.ring)
        self._changes = store.changes(lambda: wakes.add(Wake.QUEUE_CHANGED), poll_s=config.poll_interval_ms / 1000)
        self._tg: TaskGroup | None = None
        self._adopted: list[tuple[ClaimedJob, RunningJob]] = []  # before run(): started there
        self._next_due: int | None = None  # epoch ms when the earliest run_after comes due
        self._error_backoff_s = 0.1

    @property
    def config(self) -> Config:
        return self._config

    @property
    def hooks(self) -> Hooks:
        return self._hooks

    @property
    def detached(self) -> int:
        return self._stop.detached

    @property
    def quarantine(self) -> Quarantine | None:
        return self._recorder.quarantine

    def reload(self, config: Config) -> None:
        """New limits, nodes and settings for what is claimed from now on; running jobs go on untouched."""
        self._config = self._recorder.config = config
        self._runner.reconfigure(config)
        self._slots.reconfigure(config)
        self._wakes.add(Wake.NODES_CHANGED)

    def stop_all(self, reason: StopReason) -> None:
        self._stop.stop_all(self._config, reason)

    def wake(self) -> None:
        """Look now (a stop was asked for)."""
        self._wakes.ring()

    async def leave_rewritten(self) -> Quarantine:
        return await self._recorder.leave_rewritten()

    # -- the loop -----------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        """Claim and run jobs until `stop` is set; then stop by the policy (detach or drain)."""
        output.map_big_blocks_apart()  # before the first job: big outputs must not fragment the heap
        self._changes.start()
        await chores.kill_orphans(self._store, self._executors)
        logger.info("dispatch.started", worker_id=self.worker_id, push=self._changes.uses_push,
                    nodes=list(self._config.nodes), max_concurrent=self._config.max_concurrent)
        on_ready()
        output.trim_heap()  # what start-up freed (imports, migrations, recovery): 1-2 MiB of an idle daemon
        async with anyio.create_task_group() as tg:
            self._runner.bind(tg)
            self._tg = tg
            for job, running in self._adopted:
                tg.start_soon(self._run_job, job, running, self._runner.reattach, name=f"job {job.id}")
            self._adopted = []
            tg.start_soon(self._ring_on, stop)
            tg.start_soon(chores.sweep, self._store, self._executors)
            tg.start_soon(self._recorder.flush_loop)
            tg.start_soon(self._recorder.record_loop)
            tg.start_soon(self._recorder.settle_loop)
            while not stop.is_set():
                await self._guarded_step(claim=True)
                if self._store.unwritable is not None:
                    await self._leave_rewritten_file(stop)
                    break
                await self._wait(self._due_in_s())
            await self._stop.drain(self._config, lambda: self._guarded_step(claim=False), self._wait)
            await self._recorder.idle()
            self._changes.close()
            tg.cancel_scope.cancel()

    async def _ring_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wakes.ring()

    def _due_in_s(self) -> float | None:
        return None if self._next_due is None else max(0.0, (self._next_due - now_ms()) / 1000)

    async def _wait(self, timeout_s: float | None) -> None:
        await self._wakes.wait(timeout_s)
        if self._next_due is not None and now_ms() >= self._next_due:
            self._next_due = None
            self._wakes.add(Wake.RUN_AFTER_DUE)

    async def _guarded_step(self, *, claim: bool) -> None:
        """A database error (disk full, I/O, a lock held too long) must not take the daemon and its running jobs
        down: log it, wait a little, and do the same duties again on the next pass."""
        reasons = self._wakes.take()
        try:
            await self._step(reasons, claim=claim)
        except DatabaseRewritten:
            pass  # run() stops claiming and says so
        except DbError as e:
            logger.error("dispatch.db_error", error=str(e), retry_in_s=self._error_backoff_s)
            self._hooks.db_write_error()
            self._wakes.add(reasons | Wake.QUEUE_CHANGED)  # and wake: the next pass comes after the back-off
            await anyio.sleep(self._error_backoff_s)
            self._error_backoff_s = min(self._error_backoff_s * 2, 5.0)
        else:
            self._error_backoff_s = 0.1

    async def _step(self, reasons: Wake, *, claim: bool) -> None:
        if self._store.unwritable is not None:
            return
        if Wake.CLAIMS_UNKNOWN in reasons and not self._stop.stopping:
            await self._requeue_unknown_claims()
        if reasons & NOTICE_CANCELS:
            await self._notice_cancels()
        if not claim:
            self._wakes.put_back(reasons & ~NOTICE_CANCELS & ~Wake.CLAIMS_UNKNOWN)
            return
        if reasons & FAIL_UNRUNNABLE:
            await self._unrunnable.fail(self._config, cycles=bool(reasons & FIND_CYCLES))
        if reasons & CLAIM:
            try:
                await self._claimer.claim(self._config)
            except DbError:
                # The claim may have committed with its answer lost on the way (a connection cut): rows may be
                # ours that we do not know of. Once the database answers again, they are put back in the queue.
                self._wakes.put_back(Wake.CLAIMS_UNKNOWN)
                raise
        if reasons & RESCHEDULE:
            self._next_due = await self._store.next_run_after()

    async def _requeue_unknown_claims(self) -> None:
        """Rows claimed under our worker id that we are not running: a claim whose answer was lost took them. They
        never started: back to the queue (a compare-and-set on our claim and their attempt, as for an orphan)."""
        for orphan in await self._store.orphaned_jobs(self.worker_id):
            if (orphan.id, orphan.attempt) not in self.running and orphan.pid is None and await \
                    self._store.resolve_orphan(self.worker_id, orphan, requeue=True, error=UNKNOWN_CLAIM_ERROR):
                logger.warning("job.requeued", job_id=orphan.id, attempt=orphan.attempt, reason=UNKNOWN_CLAIM_ERROR)
                self._wakes.add(Wake.REQUEUED)

    async def _notice_cancels(self) -> None:
        if not self.running:
            return
        for job_id, attempt in await self._store.cancelled_among((i for i, _ in self.running), self.worker_id):
            job = self.running.get((job_id, attempt))
            if job is not None and job.stop_reason is None:
                logger.info("job.cancel_requested", job_id=job_id, node=job.node_id)
                self._runner.request_stop(job, StopReason.CANCELLED)

    async def _leave_rewritten_file(self, stop: asyncio.Event) -> None:
        """Stop touching the file; set our WAL aside; let running jobs end, their results kept beside the file."""
        await self._recorder.leave_rewritten()
        while self.running and not stop.is_set():  # their work is worth keeping; SIGTERM stops them as usual
            await self._wait(None)

    # -- jobs ---------------------------------------------------------------------------------------------

    def _start(self, job: ClaimedJob) -> None:
        assert self._tg is not None
        running = self._runner.new(job, self.worker_id)
        self._track(job, running)
        logger.info("job.claimed", job_id=job.id, node=running.node_id, tool=job.tool, attempt=job.attempt,
                    **({"pool": running.pool} if running.pool else {}))
        self._hooks.job_claimed(job)
        self._tg.start_soon(self._run_job, job, running, self._runner.run, name=f"job {job.id}")

    def _track(self, job: ClaimedJob, running: RunningJob) -> None:
        self.running[(job.id, job.attempt)] = running
        self._slots.take(running.node_id, running.pool)

    async def adopt(self, old_worker_id: str, orphan: OrphanedJob) -> bool:
        """Take over a dead or detached daemon's job (remote, or local under this host's keeper): a compare-and-set
        on its claim, then follow it; not once this daemon is stopping, so that another (or the next) daemon adopts
        it instead."""
        if self._stop.stopping:
            return False
        adopted = await self._store.adopt(old_worker_id, orphan, self.worker_id)
        if adopted is None:
            return False
        job = adopted.job
        running = self._runner.adopted(adopted, self.worker_id)
        self._track(job, running)
        logger.info("job.reattached", job_id=job.id, node=running.node_id, attempt=job.attempt,
                    from_worker=old_worker_id, stdout_bytes=adopted.stdout_bytes, stderr_bytes=adopted.stderr_bytes,
                    cancelled=adopted.cancelled)
        if self._tg is None:
            self._adopted.append((job, running))
        else:
            self._tg.start_soon(self._run_job, job, running, self._runner.reattach, name=f"job {job.id}")
        return True

    async def _run_job(self, job: ClaimedJob, running: RunningJob, run: RunFn) -> None:
        self._working += 1
        if self._working == 1:
            self._activity.busy()
        with running.scope:  # cancelled when the daemon stops and leaves the job running (detach)
            try:
                result = await run(job, running)
            except Exception as e:  # the per-job boundary: record it in the row, never take the daemon down
                logger.exception("job.internal_error", job_id=job.id)
                result = JobResult(JobStatus.FAILED, None, f"internal error in nexus-jobd: {e!r}",
                                   running.output.snapshot(final=True))
        self._release_slot(running)
        self._working -= 1
        if self._working == 0:
            self._activity.idle()
        if running.scope.cancel_called:  # detached: the next daemon follows it from what the row holds
            self.running.pop((job.id, job.attempt), None)
            self._wakes.ring()
            return
        if result.killed_outside:
            self._hooks.job_killed_outside(running.node_id)
        if result.uncount and result.error is not None and result.node_retry_at is not None:  # nothing ran there
            self._nodes.unreachable(running.node_id, result.error,
                                    max(0.0, (result.node_retry_at - now_ms()) / 1000))
        self._recorder.finished(job, running, dataclasses.replace(result, ended_monotonic=time.monotonic()))

    def _release_slot(self, running: RunningJob) -> None:
        """The process has ended: its slot can take the next job while the row is being written. With queued rows
        that depend on other jobs, the slot waits for the record (a few ms): a row this job unblocks can be
        claimed only then, and it may come first by priority (_recorded claims)."""
        running.holds_slot = False
        if self._slots.give_back(running.node_id, running.pool) and not self._unrunnable.dependents:
            self._wakes.add(Wake.SLOT_FREED)

    def _recorded(self, batch: list[Finished]) -> None:
        if any(result.run_after is not None for _, _, result in batch):
            self._wakes.add(Wake.SCHEDULE_CHANGED)
        if any(result.requeue and result.run_after is None for _, _, result in batch):
            self._wakes.add(Wake.REQUEUED)  # back in the queue at once (a pool's row, for another member): claim
        if self._unrunnable.dependents:  # a job that just ended may be what queued rows wait for
            self._wakes.add(Wake.JOB_RECORDED)
        if not self.running:
            self._wakes.ring()  # a draining loop waits for the last one
