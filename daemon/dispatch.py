"""The dispatcher: wake on change, claim within the concurrency limits, run each job, record it, flush output.

Main loop, in order: (1) if the database may have changed, check `data_version`; if another program wrote,
notice cancels, fail rows that can never run (unknown node, failed dependency) and claim; (2) claim when a slot
freed while rows were waiting, a dependency completed or a `run_after` came due; (3) sleep until woken (the store's
change source: inotify on a SQLite file, LISTEN on PostgreSQL; a finished job; stop) or the next poll or due time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup

from daemon import logging as log
from daemon import outcome, output
from daemon.config import Config
from daemon.errors import DatabaseRewritten, JobdError
from daemon.executors.base import Executor, Process
from daemon.executors.local import LocalExecutor
from daemon.health import Health
from daemon.hooks import Hooks
from daemon.lease import Lease
from daemon.model import (
    Claim,
    ClaimedJob,
    JobResult,
    JobStatus,
    OrphanedJob,
    OutputSnapshot,
    ProcessRef,
    Quarantine,
    now_ms,
)
from daemon.runner import JobRunner, RunningJob
from daemon.store import DbError, DbRejected, Store

logger = log.get("dispatch")
# After a notification, look again 1, 2, 4 ... 256 ms later, then every 256 ms: about 2 s in all, for a writer
# whose fsync between the -wal write and the commit is slow (SD cards, phones).
RECHECK_DOUBLINGS = 8
RECHECKS = 15
OWN_COMMIT_RECHECKS = 6  # 1, 2, 4 ... 32 ms: about 60 ms, a phone's fsync
IDLE_GIVE_BACK_AFTER = 100  # jobs recorded since memory was last given back, for an idle daemon to give it back
RECORD_BATCH = 16  # finished jobs written in one transaction without waiting for more
RECORD_GATHER_S = 0.002  # while other jobs run, how long a smaller batch waits for more to end
DETACH_START_WAIT_S = 5.0  # on a detaching stop, jobs still starting get this long to be started
UNKNOWN_CLAIM_ERROR = "claimed as the connection to the database was lost; never started, queued again"
SWEEP_DELAY_S = 10.0  # the leftover spools on each node are swept once, this long after start-up
T = TypeVar("T")
RunFn = Callable[[ClaimedJob, RunningJob], Awaitable[JobResult]]


class Dispatcher:
    def __init__(self, config: Config, store: Store, executors: Mapping[str, Executor], lease: Lease,
                 health: Health) -> None:
        self._config = config
        self._store = store
        self._lease = lease
        self._health = health
        self.worker_id = lease.me.worker_id
        self._executors = executors
        self._runner = JobRunner(config, executors, self._note_output)
        lease.on_requeued = self._claim_soon
        lease.adopt = self.adopt
        lease.adoptable_nodes = tuple(n for n, e in executors.items() if e.can_reattach)
        local = executors.get(config.local_node)
        if isinstance(local, LocalExecutor) and local.can_reattach:
            lease.local_node, lease.keeper_holds = config.local_node, local.holds
        self._tg: TaskGroup | None = None
        self._adopted: list[tuple[ClaimedJob, RunningJob]] = []  # before run(): started there
        self.detached = 0  # jobs left running for the next daemon at the stop
        self._abandon = False  # the lease was lost: another daemon follows our detachable jobs now
        health.changed = self.recheck_nodes
        # Claimed and not yet recorded as finished, by (job id, attempt): a row another program re-queued while it
        # ran may be claimed again before the first attempt has ended.
        self.running: dict[tuple[str, int], RunningJob] = {}
        self._slots_used = 0  # jobs whose process has not ended: what the limits count
        self._per_node = dict.fromkeys(config.nodes, 0)
        self._backlog: set[str] = set()  # nodes whose last claim was cut short by a limit
        self._wake = asyncio.Event()
        self._check_db = True
        self._rechecks = 0  # looks left after a notification
        self._recheck_step = 0  # the next look comes 2**step ms later (step capped at RECHECK_DOUBLINGS)
        self._claim_due = True
        self._version: int | None = None
        self._next_due: int | None = None  # epoch ms when the earliest run_after comes due
        self._schedule_changed = True
        self._unrunnable_due = True
        self._dependents = False  # queued rows with depends_on exist: finishing a job may unblock or fail them
        self._dirty = asyncio.Event()
        self._error_backoff_s = 0.1
        self._to_record: list[tuple[ClaimedJob, RunningJob, JobResult]] = []
        # Recorded, but only in the database's WAL so far (store.writes_settled): a whole-file rewrite would lose
        # those ends, so what ran them (the keeper, the node's spool) keeps them until the file has them.
        self._unsettled: list[Process] = []
        self._record_ready = asyncio.Event()
        self._watcher = store.watcher(self._on_db_change)
        # Another program rewrote the database file: what the daemon did about it, and where results now go.
        self.quarantine: Quarantine | None = None
        self.on_rewritten: Callable[[Quarantine], None] = lambda _: None
        self._stopping = False
        self._cycles_due = True  # look for depends_on cycles (at start, then after another program wrote)
        self._claims_unknown = False  # a claim failed with a database error: it may have taken rows all the same
        self.metrics = Hooks()  # [metrics]: the service sets its exporter

    # -- wake-ups -----------------------------------------------------------------------------------------

    def _on_db_change(self) -> None:
        # The -wal write that woke us comes just before the commit is published in the shared-memory index,
        # (after the writer's fsync, which can take tens of ms on phone or SD storage), so `data_version` may not
        # have moved yet: look again (RECHECKS). Each look is the cheap in-thread probe.
        self._check_db = True
        if not self._store.wrote_just_now():
            self._rechecks, self._recheck_step = RECHECKS, 0
        elif self._rechecks < OWN_COMMIT_RECHECKS:
            # Most likely our own commit (the lease heartbeat, an output flush): a few looks, for another
            # program's commit landing with it, and never cutting short the looks for one that came before.
            self._rechecks, self._recheck_step = OWN_COMMIT_RECHECKS, 0
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def recheck_nodes(self) -> None:
        """A node's health changed (or a heartbeat passed): claim for it, or fail what can no longer run there."""
        self._claim_due = self._unrunnable_due = True
        self._wake.set()

    def _claim_soon(self) -> None:
        self._claim_due = True
        self._wake.set()

    def _note_output(self) -> None:
        self._dirty.set()

    def _sleep_timeout(self, poll_s: float) -> float:
        if self._rechecks:
            return 0.001 * float(2 ** min(RECHECK_DOUBLINGS, self._recheck_step))
        if self._next_due is not None:
            return max(0.0, min(poll_s, (self._next_due - now_ms()) / 1000))
        return poll_s

    async def _sleep(self, timeout_s: float) -> None:
        # A timer handle rather than a cancel scope: this runs at every wake-up, and idle CPU counts on a phone.
        timed_out = False

        def timeout() -> None:
            nonlocal timed_out
            timed_out = True
            self._wake.set()

        handle = asyncio.get_running_loop().call_later(timeout_s, timeout)
        try:
            await self._wake.wait()
        finally:
            handle.cancel()
        self._wake.clear()
        if timed_out:
            self._check_db = True
            self._rechecks = max(0, self._rechecks - 1)
            self._recheck_step += 1
        if self._next_due is not None and now_ms() >= self._next_due:
            self._next_due = None
            self._claim_due = self._schedule_changed = True  # and look for the next due time after the claim

    # -- the loop -----------------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    def reload(self, config: Config) -> None:
        """New limits, nodes and settings for what is claimed from now on; running jobs go on untouched."""
        self._config = config
        self._runner.reconfigure(config)
        self._health.reconfigure(config)
        for node_id in config.nodes:
            self._per_node.setdefault(node_id, 0)
        self._claim_due = self._unrunnable_due = True
        self.wake()

    async def run(self, stop: asyncio.Event, on_ready: Callable[[], None] = lambda: None) -> None:
        """Claim and run jobs until `stop` is set; then drain: stop claiming, let running jobs end."""
        output.map_big_blocks_apart()  # before the first job: big outputs must not fragment the heap
        self._watcher.start()
        poll_s = self._watcher.poll_interval_s(self._config.poll_interval_ms / 1000)
        await self._kill_local_orphans()
        logger.info("dispatch.started", worker_id=self.worker_id, push=self._watcher.uses_push,
                    nodes=list(self._config.nodes), max_concurrent=self._config.max_concurrent)
        on_ready()
        output.trim_heap()  # what start-up freed (imports, migrations, recovery): 1-2 MiB of an idle daemon
        async with anyio.create_task_group() as tg:
            self._runner.bind(tg)
            self._tg = tg
            for job, running in self._adopted:
                tg.start_soon(self._run_job, job, running, self._runner.reattach, name=f"job {job.id}")
            self._adopted = []
            tg.start_soon(self._sweep_spools)
            tg.start_soon(self._flush_loop)
            tg.start_soon(self._record_loop)
            tg.start_soon(self._lease.run)
            while not stop.is_set():
                await self._guarded_step(tg, claim=True)
                if self._store.rewritten is not None:
                    await self._leave_rewritten_file(stop, poll_s)
                    break
                await self._sleep(self._sleep_timeout(poll_s))
            await self._drain(tg, poll_s)
            await self._settle()
            self._watcher.close()
            tg.cancel_scope.cancel()

    async def _guarded_step(self, tg: TaskGroup, *, claim: bool) -> None:
        """A database error (disk full, I/O, a lock held too long) must not take the daemon and its running jobs
        down: log it, wait a little, and try again on the next pass."""
        try:
            await self._step(tg, claim=claim)
        except DatabaseRewritten:
            pass  # run() stops claiming and says so
        except DbError as e:
            logger.error("dispatch.db_error", error=str(e), retry_in_s=self._error_backoff_s)
            self.metrics.db_write_error()
            self._check_db = self._claim_due = True
            await anyio.sleep(self._error_backoff_s)
            self._error_backoff_s = min(self._error_backoff_s * 2, 5.0)
        else:
            self._error_backoff_s = 0.1

    async def _step(self, tg: TaskGroup, *, claim: bool) -> None:
        if self._store.rewritten is not None:
            return
        if self._claims_unknown and not self._stopping:
            await self._requeue_unknown_claims()
        if self._check_db:
            self._check_db = False
            if await self._another_program_wrote():
                await self._notice_cancels()
                self._cycles_due = True
                self._claim_due = self._schedule_changed = self._unrunnable_due = True
        if not claim:
            return
        if self._unrunnable_due:
            self._unrunnable_due = False
            await self._fail_unrunnable()
        if self._claim_due:
            self._claim_due = False
            await self._claim(tg)
        if self._schedule_changed:
            self._schedule_changed = False
            self._next_due = await self._store.next_run_after()

    async def _another_program_wrote(self) -> bool:
        """The cheap probe first (any commit, ours too), then the connection that does not count its own. Before
        both, whether the file is still ours: a rewrite by another program shows on the same wake-up."""
        if (problem := self._store.check_rewritten()) is not None:
            raise DatabaseRewritten(problem)
        if not self._store.anyone_committed():
            return False
        version = await self._store.data_version()
        changed = version != self._version
        self._version = version
        if changed:  # what the notification announced is visible now
            self._rechecks = 0
        return changed

    async def _fail_unrunnable(self) -> None:
        """Rows that can never run fail at once with the reason: an unknown node, a dependency that failed."""
        for job_id, reason in await self._store.fail_malformed():
            logger.warning("job.failed", job_id=job_id, reason=reason)
        for job_id, node_id in await self._store.fail_unknown_nodes(self._config.node_ids):
            logger.warning("job.failed", job_id=job_id, node=node_id, reason="unknown node")
        if self._cycles_due:  # only another program's rows can make a cycle
            for job_id, depends_on in await self._store.fail_dependency_cycles():
                logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency cycle")
            self._cycles_due = False
        for job_id, depends_on in await self._store.fail_blocked_dependencies():
            logger.warning("job.failed", job_id=job_id, depends_on=depends_on, reason="dependency did not complete")
        await self._fail_for_node_health()
        self._dependents = await self._store.has_dependents()

    async def _fail_for_node_health(self) -> None:
        """A node in `error` fails its queued jobs at once; an offline one after its queue_timeout, if it has one."""
        for node in self._config.nodes.values():
            error = self._health.error_of(node.id)
            before = None
            if error is not None:
                reason = f"node {node.id} is in error: {error}"
            elif node.queue_timeout_ms and self._health.nodes[node.id].status in ("offline", "pending"):
                reason = f"node {node.id} was offline for longer than its queue_timeout_ms ({node.queue_timeout_ms})"
                before = now_ms() - node.queue_timeout_ms
            else:
                continue
            for job_id in await self._store.fail_node_jobs(node.id, reason, queued_before=before):
                logger.warning("job.failed", job_id=job_id, node=node.id, reason=reason)

    async def _requeue_unknown_claims(self) -> None:
        """Rows claimed under our worker id that we are not running: a claim whose answer was lost took them. They
        never started: back to the queue (a compare-and-set on our claim and their attempt, as for an orphan)."""
        for orphan in await self._store.orphaned_jobs(self.worker_id):
            if (orphan.id, orphan.attempt) not in self.running and orphan.pid is None and await \
                    self._store.resolve_orphan(self.worker_id, orphan, requeue=True, error=UNKNOWN_CLAIM_ERROR):
                logger.warning("job.requeued", job_id=orphan.id, attempt=orphan.attempt, reason=UNKNOWN_CLAIM_ERROR)
                self._claim_due = True
        self._claims_unknown = False

    async def _notice_cancels(self) -> None:
        if not self.running:
            return
        for job_id, attempt in await self._store.cancelled_among((i for i, _ in self.running), self.worker_id):
            job = self.running.get((job_id, attempt))
            if job is not None and job.stop_reason is None:
                logger.info("job.cancel_requested", job_id=job_id, node=job.node_id)
                self._runner.request_stop(job, "cancelled")

    async def _claim(self, tg: TaskGroup) -> None:
        for node in self._config.nodes.values():
            if not self._health.can_claim(node.id):
                continue  # offline or in error: its rows wait (or fail, see _fail_for_node_health)
            free = min(node.max_concurrent - self._per_node[node.id], self._config.max_concurrent - self._slots_used)
            if free <= 0:
                self._backlog.add(node.id)
                continue
            try:
                jobs = await self._store.claim(node.id, free, self.worker_id)
            except DbError:
                # The claim may have committed with its answer lost on the way (a connection cut): rows may be
                # ours that we do not know of. Once the database answers again, they are put back in the queue.
                self._claims_unknown = True
                raise
            if len(jobs) == free:
                self._backlog.add(node.id)
            else:
                self._backlog.discard(node.id)
            for job in jobs:
                self._start(tg, job)

    def _start(self, tg: TaskGroup, job: ClaimedJob) -> None:
        running = self._runner.new(job, self.worker_id)
        self.running[(job.id, job.attempt)] = running
        self._per_node[running.node_id] += 1
        self._slots_used += 1
        logger.info("job.claimed", job_id=job.id, node=running.node_id, tool=job.tool, attempt=job.attempt)
        self.metrics.job_claimed(job)
        tg.start_soon(self._run_job, job, running, self._runner.run, name=f"job {job.id}")

    async def adopt(self, old_worker_id: str, orphan: OrphanedJob) -> bool:
        """Take over a dead or detached daemon's job (remote, or local under this host's keeper): a compare-and-set
        on its claim, then follow it; not once this daemon is stopping, so that another (or the next) daemon adopts
        it instead."""
        if self._stopping:
            return False
        adopted = await self._store.adopt(old_worker_id, orphan, self.worker_id)
        if adopted is None:
            return False
        job = adopted.job
        running = self._runner.adopted(adopted, self.worker_id)
        self.running[(job.id, job.attempt)] = running
        self._per_node[running.node_id] = self._per_node.get(running.node_id, 0) + 1
        self._slots_used += 1
        logger.info("job.reattached", job_id=job.id, node=running.node_id, attempt=job.attempt,
                    from_worker=old_worker_id, stdout_bytes=adopted.stdout_bytes, stderr_bytes=adopted.stderr_bytes,
                    cancelled=adopted.cancelled)
        if self._tg is None:
            self._adopted.append((job, running))
        else:
            self._tg.start_soon(self._run_job, job, running, self._runner.reattach, name=f"job {job.id}")
        return True

    # -- one job ------------------------------------------------------------------------------------------

    async def _run_job(self, job: ClaimedJob, running: RunningJob, run: RunFn) -> None:
        with running.scope:  # cancelled when the daemon stops and leaves the job running (detach)
            try:
                result = await run(job, running)
            except Exception as e:  # the per-job boundary: record it in the row, never take the daemon down
                logger.exception("job.internal_error", job_id=job.id)
                result = JobResult(JobStatus.FAILED, None, f"internal error in nexus-jobd: {e!r}",
                                   running.output.snapshot(final=True))
        self._release_slot(running)
        if running.scope.cancel_called:  # detached: the next daemon follows it from what the row holds
            self.running.pop((job.id, job.attempt), None)
            self.wake()
            return
        if result.uncount and result.error is not None and result.run_after is not None:  # nothing ran there
            self._health.unreachable(running.node_id, result.error, max(0.0, (result.run_after - now_ms()) / 1000))
        self._enqueue_record(job, running, dataclasses.replace(result, ended_monotonic=time.monotonic()))

    def _release_slot(self, running: RunningJob) -> None:
        """The process has ended: its slot can take the next job while the row is being written."""
        running.holds_slot = False
        self._slots_used -= 1
        self._per_node[running.node_id] -= 1
        # With queued rows that depend on other jobs, the slot waits for the record (a few ms): a row this job
        # unblocks can be claimed only then, and it may come first by priority (_after_record claims).
        if self._backlog and not self._dependents:  # this node's rows, or another's held back by the global limit
            self._claim_due = True
            self.wake()

    def _enqueue_record(self, job: ClaimedJob, running: RunningJob, result: JobResult) -> None:
        self._to_record.append((job, running, result))
        self._record_ready.set()

    async def _record_loop(self) -> None:
        """Write finished jobs in batches: whatever ended while the last batch was being written goes next.

        The batch lives only in `_record`'s frame: a local here would keep its last outputs (up to 2 x 4 MiB of
        text per job, and the buffers behind them) alive while the daemon idles. After a batch with big outputs,
        and when the daemon goes idle after many jobs, the memory they took is given back (`_give_back_memory`):
        SQLite's page cache is full of rows nobody reads again (0.5 MiB after 500 jobs)."""
        since_given_back = 0
        while True:
            await self._record_ready.wait()
            if len(self._to_record) < RECORD_BATCH and len(self.running) > len(self._to_record):
                # Others are about to end: a moment's wait makes one transaction of what would be several
                # (each costs the SQLite thread a commit and this loop two thread hand-offs).
                await anyio.sleep(RECORD_GATHER_S)
            self._record_ready.clear()
            batch = self._take_batch()
            since_given_back += len(batch)
            big = await self._record(batch)
            del batch  # its outputs go now, not when the next batch comes
            if self._unsettled and not self.running and not self._to_record:
                await self._settle()
            if big or (since_given_back >= IDLE_GIVE_BACK_AFTER and not self.running and not self._to_record):
                since_given_back = 0
                await self._give_back_memory()

    def _take_batch(self) -> list[tuple[ClaimedJob, RunningJob, JobResult]]:
        batch, self._to_record = self._to_record, []
        return batch

    async def _record(self, batch: list[tuple[ClaimedJob, RunningJob, JobResult]]) -> bool:
        """Write one batch; True if it held big outputs (whose memory is worth giving back once they are gone)."""
        items = [(running.claim, result) for _, running, result in batch]
        try:
            with anyio.CancelScope(shield=True):
                outcomes = await self._finish(items)
        except DatabaseRewritten:
            self._keep_unrecorded(batch)
            return False
        if self._store.rewritten is not None:  # written, but into the WAL that is now set aside: not in the file
            self._keep_unrecorded(batch)
            return False
        settled = self._store.writes_settled()
        for job, running, result in batch:
            self.running.pop((job.id, job.attempt), None)
            self._log_finished(job, running, result, outcomes.get(job.id))
            if running.process is None:
                continue
            if job.id in outcomes and not settled:
                self._unsettled.append(running.process)  # the keeper or the node keeps it until the file does
            else:  # the row is final (or not ours): what it left can go
                running.process.forget(remove=job.id in outcomes)
        if settled:
            self._let_go_settled()
        self._after_record(batch)
        return any(output.is_big(result.output) for _, _, result in batch)

    async def _finish(self, items: list[tuple[Claim, JobResult]]) -> dict[str, tuple[JobStatus, int | None]]:
        """Record the batch (retried while the database is away). A batch whose values the database refuses is
        written row by row: one bad row never holds up the others, and is never retried for ever."""
        try:
            return await self._retry_write("finish", partial(self._store.finish_many, items))
        except DbRejected:
            outcomes: dict[str, tuple[JobStatus, int | None]] = {}
            for claim, result in items:
                outcomes |= await self._finish_alone(claim, result)
            return outcomes

    async def _finish_alone(self, claim: Claim, result: JobResult) -> dict[str, tuple[JobStatus, int | None]]:
        """One row's result; if the database refuses its values, a result it can hold, with the reason."""
        try:
            return await self._retry_write("finish", partial(self._store.finish_many, [(claim, result)]))
        except DbRejected as e:
            refused = outcome.unrecordable(result, str(e))
        logger.error("job.result_refused", job_id=claim.job_id, attempt=claim.attempt, error=refused.error)
        try:
            return await self._retry_write("finish", partial(self._store.finish_many, [(claim, refused)]))
        except DbRejected as e:  # nothing of ours can be written to it: the row stays as it is
            logger.error("job.unrecordable", job_id=claim.job_id, attempt=claim.attempt, error=str(e))
            return {}

    def _let_go_settled(self) -> None:
        """What ran jobs whose ends are now in the database file for good can let go of them."""
        unsettled, self._unsettled = self._unsettled, []
        for process in unsettled:
            process.forget(remove=True)

    async def _settle(self) -> None:
        """Idle, or stopping: make what was recorded survive a whole-file rewrite (a checkpoint), then let go."""
        with contextlib.suppress(*DbError, DatabaseRewritten):
            await self._store.settle()
        if self._store.writes_settled():
            self._let_go_settled()

    async def _give_back_memory(self) -> None:
        """SQLite's page cache (up to 2 MiB, full of the rows just written), then the heap's free pages (2-3 MiB
        after a 20 MB job): what big outputs left behind once nothing refers to them. About 1 ms, after big jobs
        only."""
        with contextlib.suppress(*DbError):
            await self._store.release_memory()
        output.trim_heap()

    def _after_record(self, batch: list[tuple[ClaimedJob, RunningJob, JobResult]]) -> None:
        if any(result.run_after is not None for _, _, result in batch):
            self._schedule_changed = True
        if self._dependents:  # a job that just ended may be what queued rows wait for
            self._claim_due = self._unrunnable_due = True
        if not self.running or self._claim_due or self._schedule_changed:
            self.wake()  # a draining loop waits for the last one

    def _log_finished(self, job: ClaimedJob, running: RunningJob, result: JobResult,
                      outcome: tuple[JobStatus, int | None] | None) -> None:
        if outcome is None:  # someone else's claim now: we must not, and did not, touch the row
            logger.warning("job.claim_lost", job_id=job.id, node=running.node_id, exit_code=result.exit_code)
            return
        event = "job.requeued" if outcome[0] == JobStatus.QUEUED else "job.finished"
        logger.info(event, job_id=job.id, node=running.node_id, tool=running.tool, status=outcome[0].value,
                    exit_code=result.exit_code, duration_ms=outcome[1], error=result.error, attempt=job.attempt,
                    run_after=result.run_after, stdout_bytes=result.output.stdout_bytes,
                    stderr_bytes=result.output.stderr_bytes)
        if outcome[0].is_final:
            self.metrics.job_finished(running.node_id, running.tool, outcome[0].value, outcome[1])

    async def _retry_write(self, what: str, write: Callable[[], Awaitable[T]]) -> T:
        """A write that must not be lost: on a database error (disk full, I/O), log it and try again with backoff.
        Anything else is a bug: it propagates and stops the daemon loudly (a restart recovers its jobs)."""
        delay = 0.1
        while True:
            try:
                return await write()
            except DbRejected:
                raise  # the same values would be refused again: the caller decides for that row
            except DbError as e:
                logger.error("db.write_failed", what=what, error=str(e), retry_in_s=delay)
                self.metrics.db_write_error()
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- output flushing ----------------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        """Flush dirty output of all running jobs in one transaction, at most every flush_interval/2.

        A flush rewrites whole rows (SQLite has no in-place append), so after a slow one we wait 3x as long
        as it took: writing never takes more than a quarter of the time, however large the rows grow.
        """
        half = self._config.flush_interval_ms / 2000
        while True:
            await self._dirty.wait()
            await anyio.sleep(half)
            started = time.monotonic()
            await self._flush_once()
            await anyio.sleep(max(0.0, 3 * (time.monotonic() - started) - half))

    async def _flush_once(self) -> None:
        """Output that changed, and where each new job runs (what crash recovery kills)."""
        self._dirty.clear()
        batch = []
        for job in list(self.running.values()):
            ref = None if job.pid_recorded else self._runner.process_ref(job)
            if job.holds_slot and not job.flush_refused and (job.output.dirty or ref is not None):
                batch.append((job, job.output.snapshot(), ref))
        if not batch:
            return
        try:
            await self._write_outputs(batch)
        except DatabaseRewritten:
            self.wake()  # the loop notices and stops writing; the output stays in memory until the job ends
            return
        for job, _, ref in batch:
            job.pid_recorded = job.pid_recorded or ref is not None

    async def _write_outputs(self, batch: list[tuple[RunningJob, OutputSnapshot, ProcessRef | None]]) -> None:
        """One transaction for all; if the database refuses the values, job by job, and a job it refuses is not
        flushed again (its end is recorded with the reason: _finish_alone)."""
        rows = [(job.claim, out, ref) for job, out, ref in batch]
        try:
            await self._retry_write("output", partial(self._store.write_outputs, rows))
            return
        except DbRejected:
            pass
        for job, out, ref in batch:
            try:
                await self._retry_write("output", partial(self._store.write_outputs, [(job.claim, out, ref)]))
            except DbRejected as e:
                job.flush_refused = True
                logger.error("job.output_refused", job_id=job.claim.job_id, error=str(e))

    # -- another program rewrote the database --------------------------------------------------------------

    async def _leave_rewritten_file(self, stop: asyncio.Event, poll_s: float) -> None:
        """Stop touching the file; set our WAL aside; let running jobs end, their results kept beside the file."""
        await self.leave_rewritten()
        while self.running and not stop.is_set():  # their work is worth keeping; SIGTERM stops them as usual
            await self._sleep(poll_s)

    async def leave_rewritten(self) -> Quarantine:
        """The file is no longer ours: report what was seen and which attempts run (for the next daemon), say so
        once in the log and to the supervisor. Also at start-up, before `run`, for a rewrite found then."""
        attempts = []
        for job in self.running.values():
            ref = self._runner.process_ref(job)
            attempts.append({"id": job.claim.job_id, "attempt": job.claim.attempt, "node_id": job.node_id,
                             "started_at": job.started_at, "pid": ref.pid if ref else None,
                             "pid_start": ref.start if ref else None})
        me = self._lease.me
        quarantine = await self._store.quarantine(running=attempts, worker=dataclasses.asdict(me))
        self.quarantine = quarantine
        if quarantine.kept:
            self._let_go_settled()  # their ends are kept beside the file now: the keeper need not hold them
        running = sorted(str(job["id"]) for job in attempts)
        logger.error("db.rewritten", message=quarantine.message, db=self._store.name, reason=quarantine.reason,
                     not_recorded=quarantine.unrecorded, running=running,
                     wal_set_aside=[str(p) for p in quarantine.set_aside], results=str(quarantine.results),
                     report=str(quarantine.report))
        self.on_rewritten(quarantine)
        return quarantine

    def _keep_unrecorded(self, batch: list[tuple[ClaimedJob, RunningJob, JobResult]]) -> None:
        """Jobs that ended after the rewrite: their results go to a file beside the database, never into it; once
        kept there, what ran them may let go (the next daemon on a usable file records them from there)."""
        rows = []
        for job, running, result in batch:
            self.running.pop((job.id, job.attempt), None)
            out, final = result.output, not result.requeue
            rows.append({"id": job.id, "node_id": running.node_id, "tool": running.tool, "attempt": job.attempt,
                         "worker_id": self.worker_id, "status": result.status.value if final else "queued",
                         "uncount": result.uncount, "exit_code": result.exit_code, "error": result.error,
                         "started_at": job.started_at if final else None, "ended_at": now_ms() if final else None,
                         "run_after": result.run_after, "stdout": out.stdout, "stderr": out.stderr,
                         "stdout_bytes": out.stdout_bytes, "stderr_bytes": out.stderr_bytes})
            logger.error("job.unrecorded", job_id=job.id, node=running.node_id, status=result.status.value,
                         exit_code=result.exit_code, error=result.error, stdout_bytes=out.stdout_bytes,
                         stderr_bytes=out.stderr_bytes,
                         results=str(self.quarantine.results) if self.quarantine else None,
                         reason="the database was rewritten by another program; the result is kept beside it")
        try:
            self._store.keep_results(rows)
            kept = True
        except (OSError, JobdError) as e:
            kept = False
            logger.error("job.results_not_kept", error=str(e), jobs=[row["id"] for row in rows])
        for _, running, _ in batch:
            if running.process is not None:
                running.process.forget(remove=kept)
        self.wake()

    # -- shutdown -----------------------------------------------------------------------------------------

    async def _drain(self, tg: TaskGroup, poll_s: float) -> None:
        """Stop claiming but keep noticing cancels; after `shutdown_grace`, TERM/KILL what is still running.
        With on_stop = "detach" (or a lost lease), detachable jobs
        (remote, or local under the keeper) are first left to run on (see _detach)."""
        self._stopping = True  # no more adoptions: a job taken over now would only be stopped with the rest
        if self._config.on_stop == "detach" or self._abandon:
            await self._detach()
        if not self.running:
            return
        grace_s = self._config.shutdown_grace_ms / 1000
        logger.info("dispatch.draining", running=len(self.running), grace_s=grace_s)
        deadline = time.monotonic() + grace_s
        stopped = False
        while self.running:
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not stopped:
                stopped = True
                self.stop_all("shutdown")
            await self._guarded_step(tg, claim=False)
            await self._sleep(min(self._sleep_timeout(poll_s), remaining if remaining > 0 else poll_s))

    def stop_all(self, reason: str) -> None:
        """Stop every running job; after a lost lease, remote jobs are left alone: the daemon that declared us dead
        adopted them. Local jobs under the keeper are stopped: if another daemon of this host adopted one, the
        keeper gave it to that daemon (TAKEN) and ignores our signal; if none did (it was recovered from another
        host, which cannot reach our keeper), nobody else will stop it."""
        if reason == "lease lost":
            self._abandon = True
        for job in list(self.running.values()):
            if not (self._abandon and self._left_running(job)):
                self._runner.request_stop(job, reason)
        self.wake()

    def _left_running(self, job: RunningJob) -> bool:
        """A job that runs on without this daemon: detached at a stop, or abandoned after a lost lease."""
        if job.process is None or not job.process.detachable:
            return False
        return not self._abandon or job.node_id != self._config.local_node

    async def _detach(self) -> None:
        """Leave detachable jobs (remote, or local under the keeper) running for the next daemon: wait a little for
        those still starting, record the output read so far, and stop following them (their rows stay `executing`
        under this daemon's id; the next daemon, or any live one serving the node, adopts them)."""
        for _ in range(int(DETACH_START_WAIT_S / 0.05)):
            if not any(self._starting_remote(job) for job in self.running.values()):
                break
            await anyio.sleep(0.05)
        leaving = [job for job in self.running.values() if self._left_running(job) and job.holds_slot]
        if not leaving:
            return
        if not self._abandon:
            with anyio.CancelScope(shield=True):
                await self._flush_once()
        for job in leaving:
            job.end_timers()
            job.scope.cancel()
        self.detached = len(leaving)
        logger.info("dispatch.detached", jobs=len(leaving), job_ids=sorted(j.claim.job_id for j in leaving))
        for _ in range(500):  # their tasks end at the next turn of the loop
            if not any(job in self.running.values() for job in leaving):
                break
            await anyio.sleep(0.01)

    def _starting_remote(self, job: RunningJob) -> bool:
        executor = self._executors.get(job.node_id)
        return job.process is None and executor is not None and executor.can_reattach and job.holds_slot

    async def _kill_local_orphans(self) -> None:
        """Before claiming anything: what this host's keeper still holds of attempts whose rows are final or back in
        the queue is killed and let go: on a database other hosts share, another host's daemon recovered them while
        this host was away; on any database, a daemon that died between recording a row and telling the keeper
        left the keeper holding a finished job (it would stay for ever)."""
        local = self._executors.get(self._config.local_node)
        if not isinstance(local, LocalExecutor):
            return
        try:
            killed = await local.kill_orphans(partial(self._store.finished_attempts, self._config.local_node))
        except Exception as e:  # the keeper cannot start, or the database is away: jobs still run; say so
            logger.error("dispatch.orphans_unchecked", error=str(e) or type(e).__name__)
            return
        for key in killed:
            logger.warning("job.orphan_killed", attempt=key,
                           reason="its row is final or back in the queue: this attempt no longer runs here")

    async def _sweep_spools(self) -> None:
        """Once, a while after start-up: directories on each remote node whose attempt is no longer running
        (its row is final or gone, its daemon could not remove them) are removed, their processes killed."""
        await anyio.sleep(SWEEP_DELAY_S)
        for node_id, executor in self._executors.items():
            try:
                await executor.sweep(partial(self._store.finished_attempts, node_id))
            except Exception as e:  # a chore: whatever goes wrong, the next start tries again
                logger.warning("ssh.sweep_failed", node=node_id, error=str(e) or type(e).__name__)


