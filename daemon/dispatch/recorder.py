"""Recording: finished jobs written in batches, live output flushed, writes retried while the database is away, and,
once the store can no longer be written, every result kept beside it instead."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import anyio

from daemon import logging as log
from daemon import outcome, output
from daemon.config import Config
from daemon.errors import DatabaseRewritten, JobdError
from daemon.executors.base import Process
from daemon.hooks import Hooks
from daemon.model import Claim, ClaimedJob, JobResult, JobStatus, OutputSnapshot, ProcessRef, Quarantine, now_ms
from daemon.runner import RunningJob
from daemon.store import DbError, DbRejected, Store

logger = log.get("dispatch")
T = TypeVar("T")
IDLE_GIVE_BACK_AFTER = 100  # jobs recorded since memory was last given back, for an idle daemon to give it back
RECORD_BATCH = 16  # finished jobs written in one transaction without waiting for more
RECORD_GATHER_S = 0.002  # while other jobs run, how long a smaller batch waits for more to end
SETTLE_WHEN_IDLE_S = 0.25  # idle this long with ends recorded only in a WAL: they are settled (a checkpoint)
Finished = tuple[ClaimedJob, RunningJob, JobResult]


class Recorder:
    """Owns the writes of running and finished jobs. `running` is the dispatcher's table of jobs claimed and not
    yet recorded (shared: the recorder removes what it records); `on_recorded` hears of each batch written."""

    def __init__(self, config: Config, store: Store, running: dict[tuple[str, int], RunningJob],
                 process_ref: Callable[[RunningJob], ProcessRef | None], hooks: Hooks, worker: Mapping[str, Any],
                 on_recorded: Callable[[list[Finished]], None], on_rewritten: Callable[[Quarantine], None]) -> None:
        self.config = config
        self._store, self._running, self._process_ref, self._hooks = store, running, process_ref, hooks
        self._worker, self._on_recorded, self._on_rewritten = worker, on_recorded, on_rewritten
        self._to_record: list[Finished] = []
        self._ready = asyncio.Event()
        self._dirty = asyncio.Event()
        # Recorded, but only in the database's WAL so far (store.writes_settled): a whole-file rewrite would lose
        # those ends, so what ran them (the keeper, the node's spool) keeps them until the file has them.
        self._unsettled: list[Process] = []
        self._to_settle = asyncio.Event()
        self.quarantine: Quarantine | None = None  # set once the store could no longer be written

    # -- finished jobs --------------------------------------------------------------------------------------

    def finished(self, job: ClaimedJob, running: RunningJob, result: JobResult) -> None:
        self._to_record.append((job, running, result))
        self._ready.set()

    async def record_loop(self) -> None:
        """Write finished jobs in batches: whatever ended while the last batch was being written goes next.

        The batch lives only in `_record`'s frame: a local here would keep its last outputs (up to 2 x 4 MiB of
        text per job, and the buffers behind them) alive while the daemon idles. After a batch with big outputs,
        and when the daemon goes idle after many jobs, the store gives back what it holds (SQLite's page cache is
        full of rows nobody reads again: 0.5 MiB after 500 jobs) and the heap its free pages."""
        since_given_back = 0
        while True:
            await self._ready.wait()
            if len(self._to_record) < RECORD_BATCH and len(self._running) > len(self._to_record):
                # Others are about to end: a moment's wait makes one transaction of what would be several
                # (each costs the SQLite thread a commit and this loop two thread hand-offs).
                await anyio.sleep(RECORD_GATHER_S)
            self._ready.clear()
            batch, self._to_record = self._to_record, []
            since_given_back += len(batch)
            big = await self._record(batch)
            del batch  # its outputs go now, not when the next batch comes
            if big or (self._idle() and since_given_back >= IDLE_GIVE_BACK_AFTER):
                since_given_back = 0
                await self.idle()

    async def _record(self, batch: list[Finished]) -> bool:
        """Write one batch; True if it held big outputs (whose memory is worth giving back once they are gone)."""
        items = [(running.claim, result) for _, running, result in batch]
        try:
            with anyio.CancelScope(shield=True):
                outcomes = await self._finish(items)
        except DatabaseRewritten:
            self.keep_unrecorded(batch)
            return False
        if self._store.unwritable is not None:  # written, but into the WAL that is now set aside: not in the file
            self.keep_unrecorded(batch)
            return False
        settled = self._store.writes_settled()
        for job, running, result in batch:
            self._running.pop((job.id, job.attempt), None)
            self._log_finished(job, running, result, outcomes.get(job.id))
            if running.process is None:
                continue
            if job.id in outcomes and not settled:
                self._unsettled.append(running.process)  # the keeper or the node keeps it until the file does
                self._to_settle.set()
            else:  # the row is final (or not ours): what it left can go
                running.process.forget(remove=job.id in outcomes)
        if settled:
            self._let_go_settled()
        self._on_recorded(batch)
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
            self._hooks.job_finished(running.node_id, running.tool, outcome[0].value, outcome[1])

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
                self._hooks.db_write_error()
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- settling and memory --------------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not self._running and not self._to_record

    async def settle_loop(self) -> None:
        """Once the daemon has been idle for a moment with ends recorded only in the WAL: settle them. Not at every
        pause between two batches (a checkpoint is an fsync; under load the WAL's own checkpoints settle them)."""
        while True:
            await self._to_settle.wait()
            await anyio.sleep(SETTLE_WHEN_IDLE_S)
            if not self._unsettled:
                self._to_settle.clear()
            elif self._idle():
                self._to_settle.clear()
                await self.idle()

    def _let_go_settled(self) -> None:
        """What ran jobs whose ends are now in the database file for good can let go of them."""
        unsettled, self._unsettled = self._unsettled, []
        for process in unsettled:
            process.forget(remove=True)

    async def idle(self) -> None:
        """Idle, big rows just written, or stopping: the store settles its writes and gives back what it holds (a
        checkpoint and SQLite's page cache), the heap its free pages (2-3 MiB after a 20 MB job); then what ran
        jobs whose ends are settled lets go. About 1 ms."""
        with contextlib.suppress(*DbError, DatabaseRewritten):
            await self._store.idle()
        if self._store.writes_settled():
            self._let_go_settled()
        output.trim_heap()

    # -- live output ----------------------------------------------------------------------------------------

    def output_changed(self) -> None:
        self._dirty.set()

    async def flush_loop(self) -> None:
        """Flush dirty output of all running jobs in one transaction, at most every flush_interval/2.

        A flush rewrites whole rows (SQLite has no in-place append), so after a slow one we wait 3x as long
        as it took: writing never takes more than a quarter of the time, however large the rows grow.
        """
        while True:
            await self._dirty.wait()
            half = self.config.flush_interval_ms / 2000
            await anyio.sleep(half)
            started = time.monotonic()
            await self.flush_once()
            await anyio.sleep(max(0.0, 3 * (time.monotonic() - started) - half))

    async def flush_once(self) -> None:
        """Output that changed, and where each new job runs (what crash recovery kills)."""
        self._dirty.clear()
        batch = []
        for job in list(self._running.values()):
            ref = None if job.pid_recorded else self._process_ref(job)
            if job.holds_slot and not job.flush_refused and (job.output.dirty or ref is not None):
                batch.append((job, job.output.snapshot(), ref))
        if not batch:
            return
        try:
            await self._write_outputs(batch)
        except DatabaseRewritten:
            return  # the loop notices and stops writing; the output stays in memory until the job ends
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

    # -- the store can no longer be written -----------------------------------------------------------------

    async def leave_rewritten(self) -> Quarantine:
        """Report what was seen and which attempts run (for the next daemon), say so once in the log and to the
        supervisor. Also at start-up, before the loop runs, for a rewrite found then."""
        attempts = []
        for job in self._running.values():
            ref = self._process_ref(job)
            attempts.append({"id": job.claim.job_id, "attempt": job.claim.attempt, "node_id": job.node_id,
                             "started_at": job.started_at, "pid": ref.pid if ref else None,
                             "pid_start": ref.start if ref else None})
        quarantine = await self._store.quarantine(running=attempts, worker=self._worker)
        self.quarantine = quarantine
        if quarantine.kept:
            self._let_go_settled()  # their ends are kept beside the file now: the keeper need not hold them
        logger.error("db.rewritten", message=quarantine.message, db=self._store.name, reason=quarantine.reason,
                     not_recorded=quarantine.unrecorded, running=sorted(str(job["id"]) for job in attempts),
                     wal_set_aside=[str(p) for p in quarantine.set_aside], results=str(quarantine.results),
                     report=str(quarantine.report))
        self._on_rewritten(quarantine)
        return quarantine

    def keep_unrecorded(self, batch: list[Finished]) -> None:
        """Jobs that ended after the rewrite: their results go to a file beside the database, never into it; once
        kept there, what ran them may let go (the next daemon on a usable file records them from there)."""
        rows = [self._kept_row(job, running, result) for job, running, result in batch]
        try:
            self._store.keep_results(rows)
            kept = True
        except (OSError, JobdError) as e:
            kept = False
            logger.error("job.results_not_kept", error=str(e), jobs=[row["id"] for row in rows])
        for job, running, _ in batch:
            self._running.pop((job.id, job.attempt), None)
            if running.process is not None:
                running.process.forget(remove=kept)
        self._on_recorded([])

    def _kept_row(self, job: ClaimedJob, running: RunningJob, result: JobResult) -> dict[str, Any]:
        out, final = result.output, not result.requeue
        logger.error("job.unrecorded", job_id=job.id, node=running.node_id, status=result.status.value,
                     exit_code=result.exit_code, error=result.error, stdout_bytes=out.stdout_bytes,
                     stderr_bytes=out.stderr_bytes, results=str(self.quarantine.results) if self.quarantine else None,
                     reason="the database was rewritten by another program; the result is kept beside it")
        return {"id": job.id, "node_id": running.node_id, "tool": running.tool, "attempt": job.attempt,
                "worker_id": running.claim.worker_id, "status": result.status.value if final else "queued",
                "uncount": result.uncount, "exit_code": result.exit_code, "error": result.error,
                "started_at": job.started_at if final else None, "ended_at": now_ms() if final else None,
                "run_after": result.run_after, "stdout": out.stdout, "stderr": out.stderr,
                "stdout_bytes": out.stdout_bytes, "stderr_bytes": out.stderr_bytes}
