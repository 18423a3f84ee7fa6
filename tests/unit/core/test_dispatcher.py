"""daemon.dispatch.Dispatcher on the fakes: rows claimed within the limits, run and recorded under their claim; woken
for explicit reasons (a cancel noticed when the queue changed, a retry when its run_after comes due, a row a job
unblocks claimed only once that job's end is recorded); a claim whose answer was lost; a store that can no longer be
written; and the stop policy (drain, detach, abandon after a lost lease)."""

from __future__ import annotations

import asyncio
import signal

import anyio
import pytest

from daemon.dispatch import Wake, Wakes
from daemon.dispatch.dispatcher import UNKNOWN_CLAIM_ERROR
from daemon.dispatch.wakes import EVERYTHING
from daemon.errors import NodeUnreachable
from daemon.model import Claim, JobStatus, OrphanedJob, StopReason
from daemon.outcome import LEASE_LOST_ERROR, SHUTDOWN_ERROR, TIMEOUT_EXIT_CODE
from daemon.store import DbUnavailable
from tests.unit.core.conftest import Sleeps
from tests.unit.core.fakes import WORKER_ID, Changed, FakeExecutor, FakeStore, config, dispatching

pytestmark = pytest.mark.anyio


async def test_a_queued_row_is_claimed_run_and_its_end_recorded_under_its_claim() -> None:
    async with dispatching() as h:
        h.store.insert("a", command="echo hi")
        (process,) = await h.started(1)
        assert process.command is not None and process.command.argv == ("bash", "-c", "--", "echo hi")
        assert process.key == "a:1" and h.hooks.claimed == ["a"]
        process.end(0, stdout=b"hi\n")
        row = await h.recorded("a")
    (items,) = h.store.called("finish_many")
    ((claim, res),) = items
    assert claim == Claim("a", WORKER_ID, 1)
    assert (res.status, res.exit_code, res.error, res.output.stdout, res.output.stdout_bytes) == (
        JobStatus.COMPLETED, 0, None, "hi\n", 3)
    assert res.ended_monotonic is not None
    assert (row.status, row.stdout) == ("completed", "hi\n")
    assert process.forgotten == [True] and h.dispatcher.running == {}


async def test_a_failed_attempt_runs_again_when_its_back_off_is_due() -> None:
    async with dispatching(config(retry_backoff_ms=20)) as h:
        h.store.insert("a", max_attempts=2)
        (first,) = await h.started(1)
        first.end(1)
        second = (await h.started(2))[1]
        assert second.key == "a:2"  # claimed again once its run_after came due (RUN_AFTER_DUE), not before
        (retry,) = h.finishes_of("a")
        assert retry.requeue and retry.run_after is not None
        second.end(0)
        row = await h.recorded("a")
    assert (row.status, row.attempt) == ("completed", 2)


async def test_a_slot_freed_takes_the_highest_priority_row_waiting() -> None:
    async with dispatching(config(nodes={"localhost": 1})) as h:
        h.store.insert("first")
        (first,) = await h.started(1)
        h.store.insert("low", priority=0)
        h.store.insert("high", priority=9)
        await h.looked(Wake.QUEUE_CHANGED)
        assert len(h.executor.processes) == 1  # the node's one slot is taken
        first.end(0)
        second = (await h.started(2))[1]
        assert second.key == "high:1" and h.store.rows["low"].status == "queued"
        second.end(0)
        third = (await h.started(3))[2]
        assert third.key == "low:1"
        third.end(0)
        await h.recorded("low")
    assert all(limit == 1 for _, limit in h.store.called("claim"))


async def test_a_row_its_dependency_unblocks_waits_for_that_record_and_comes_first_by_priority() -> None:
    """Issue 18.10: with one slot, a priority-9 row that depends on the running job must run before a priority-0
    row queued earlier. The slot freed by the job's end is not claimed for until its end is recorded."""
    async with dispatching(config(nodes={"localhost": 1})) as h:
        h.store.insert("a")
        (a,) = await h.started(1)
        h.store.insert("low", priority=0)
        h.store.insert("high", priority=9, depends_on="a")
        await h.looked(Wake.QUEUE_CHANGED)
        h.store.finish_gate = gate = asyncio.Event()  # the end of `a` is being written...
        claims = len(h.store.called("claim"))
        a.end(0)
        await h.changed.until(lambda: h.store.called("finish_many"), what="a's end being written")
        await h.looked()  # ...and the loop has looked meanwhile: no claim while the record is pending
        assert len(h.store.called("claim")) == claims and h.store.rows["low"].status == "queued"
        gate.set()
        second = (await h.started(2))[1]
        assert second.key == "high:1" and h.store.rows["low"].status == "queued"
        second.end(0)
        (await h.started(3))[2].end(0)
        await h.recorded("low")


async def test_a_cancel_is_noticed_when_the_queue_changed_and_the_row_stays_cancelled() -> None:
    async with dispatching() as h:
        h.store.insert("a", max_attempts=3)
        (process,) = await h.started(1)
        h.store.rows["a"].status = "cancelled"  # written, but not yet noticed as a change
        looks = len(h.store.called("cancelled_among"))
        await h.looked(Wake.NODES_CHANGED)
        assert len(h.store.called("cancelled_among")) == looks  # only a change of the queue calls for that look
        assert process.signals == []
        h.store.queue_changed()
        await h.changed.until(lambda: process.signals, what="the cancel noticed")
        row = await h.recorded("a")
    assert process.signals == [signal.SIGTERM]
    (res,) = h.finishes_of("a")
    assert (res.status, res.exit_code, res.error, res.requeue) == (JobStatus.FAILED, 143, None, False)
    assert row.status == "cancelled"


async def test_a_timeout_stops_the_job_and_records_124() -> None:
    async with dispatching() as h:
        h.store.insert("a", timeout_ms=20)
        (process,) = await h.started(1)
        row = await h.recorded("a")
    assert process.signals == [signal.SIGTERM]
    assert (row.status, row.exit_code) == ("failed", TIMEOUT_EXIT_CODE) and "timed out after 0.02s" in str(row.error)


async def test_a_claim_whose_answer_was_lost_is_queued_again_once_the_store_answers(loop_sleeps: Sleeps) -> None:
    async with dispatching() as h:
        h.store.insert("running")
        (running,) = await h.started(1)
        h.store.lose_claim_answer = True  # the claim commits; its answer is lost on the way
        h.store.fail("orphaned_jobs", DbUnavailable("connection refused"))  # and the store is away a while
        h.store.insert("lost")
        await h.changed.until(lambda: h.store.called("resolve_orphan"), what="the unknown claim re-queued")
        (process_of_lost,) = (await h.started(2))[1:]
        assert process_of_lost.key == "lost:2"
        running.end(0)
        process_of_lost.end(0)
        await h.recorded("lost")
    assert h.store.called("resolve_orphan") == [
        (WORKER_ID, OrphanedJob("lost", 1, 1, None, None, "localhost"), True, UNKNOWN_CLAIM_ERROR)]
    assert running.signals == [] and h.store.rows["running"].status == "completed"  # ours, running: untouched
    assert loop_sleeps.taken == [0.1, 0.2] and h.hooks.db_errors == 2


async def test_a_store_that_can_no_longer_be_written_makes_it_leave_keeping_results_beside() -> None:
    async with dispatching() as h:
        h.store.insert("a")
        (process,) = await h.started(1)
        h.store.unwritable = "the file was replaced by another program"
        h.store.queue_changed()
        await h.changed.until(lambda: h.rewritten, what="quarantine")
        claims = len(h.store.called("claim"))
        h.store.insert("b")  # nothing more is claimed from a file we may not write
        (report,) = h.store.quarantined
        assert [job["id"] for job in report["running"]] == ["a"]
        process.end(3)  # the job runs on to its end: its result is kept beside the file
        await h.changed.until(lambda: h.done.is_set(), what="the loop to leave")  # run() returns by itself
    assert len(h.store.called("claim")) == claims and h.store.rows["b"].status == "queued"
    assert [(row["id"], row["exit_code"]) for row in h.store.kept] == [("a", 3)]
    assert process.forgotten == [True] and h.store.rows["a"].status == "executing"


async def test_a_draining_stop_waits_for_running_jobs_and_claims_nothing() -> None:
    async with dispatching(config(on_stop="drain", shutdown_grace_ms=60_000)) as h:
        h.store.insert("a")
        (process,) = await h.started(1)
        h.stop.set()
        before = len(h.store.called("cancelled_among"))
        h.store.insert("b")  # a change of the queue: cancels are still noticed, nothing is claimed
        await h.changed.until(lambda: len(h.store.called("cancelled_among")) > before, what="a look while draining")
        assert not h.done.is_set() and process.signals == [] and h.store.rows["b"].status == "queued"
        process.end(0)
        await h.changed.until(lambda: h.done.is_set(), what="the drain to end")
    assert h.store.rows["a"].status == "completed" and h.store.rows["b"].status == "queued"


async def test_after_the_grace_a_draining_stop_stops_jobs_and_queues_them_again() -> None:
    async with dispatching(config(on_stop="drain", shutdown_grace_ms=1)) as h:
        h.store.insert("a", max_attempts=2)
        (process,) = await h.started(1)
    assert process.signals == [signal.SIGTERM]
    (res,) = h.finishes_of("a")
    assert (res.exit_code, res.error, res.requeue, res.run_after) == (143, SHUTDOWN_ERROR, True, None)
    assert h.store.rows["a"].status == "queued"


@pytest.mark.parametrize("detachable", [True, False])
async def test_a_detaching_stop_leaves_detachable_jobs_running_and_drains_the_others(detachable: bool) -> None:
    changed = Changed()
    executor = FakeExecutor(changed, detachable=detachable)
    async with dispatching(config(on_stop="detach"), store=FakeStore(changed), executors={"localhost": executor}) as h:
        h.store.insert("a")
        (process,) = await h.started(1)
        process.write(b"so far")
    if detachable:  # left for the next daemon: its output so far written, its row ours and executing
        assert process.signals == [] and h.dispatcher.detached == 1 and h.store.called("finish_many") == []
        assert h.store.rows["a"].stdout == "so far" and h.store.rows["a"].status == "executing"
        assert process.forgotten == []
    else:
        assert process.signals == [signal.SIGTERM] and h.dispatcher.detached == 0
        assert h.store.rows["a"].status == "failed" and h.store.rows["a"].error == SHUTDOWN_ERROR


async def test_after_a_lost_lease_remote_jobs_are_left_and_local_ones_stopped() -> None:
    changed = Changed()
    executors = {"localhost": FakeExecutor(changed, detachable=True),
                 "far": FakeExecutor(changed, reattach=True, detachable=True)}
    settings = config(nodes={"localhost": 2, "far": 2}, on_stop="drain")
    async with dispatching(settings, store=FakeStore(changed), executors=executors) as h:
        h.store.insert("here")
        h.store.insert("there", node_id="far")
        (here,) = await h.started(1, "localhost")
        (there,) = await h.started(1, "far")
        h.dispatcher.stop_all(StopReason.LEASE_LOST)
        await h.changed.until(lambda: here.signals, what="the local job stopped")
    assert here.signals == [signal.SIGTERM] and there.signals == []
    assert h.dispatcher.detached == 1 and h.finishes_of("there") == []
    (res,) = h.finishes_of("here")
    assert (res.error, res.requeue) == (LEASE_LOST_ERROR, False)


async def test_a_node_that_does_not_answer_is_marked_and_the_job_waits_uncounted() -> None:
    async with dispatching() as h:
        h.executor.start_error = NodeUnreachable("no route to host", retry_in_s=30)
        h.store.insert("a", max_attempts=1)
        await h.changed.until(lambda: h.finishes_of("a"), what="the attempt recorded")
        await h.looked()
    ((node, error, retry_in_s),) = h.nodes.unreachable_calls
    assert (node, error) == ("localhost", "not started yet: no route to host; it waits for the node")
    assert 25 < retry_in_s <= 30
    row = h.store.rows["a"]
    assert (row.status, row.attempt) == ("queued", 0) and row.run_after is not None  # not an attempt; not claimed
    assert h.executor.processes == []


async def test_an_internal_error_fails_that_job_only() -> None:
    async with dispatching() as h:
        h.executor.start_error = RuntimeError("boom")
        h.store.insert("a")
        row = await h.recorded("a")
        h.store.insert("b")
        (process,) = await h.started(1)
        process.end(0)
        await h.recorded("b")
    assert (row.status, row.error) == ("failed", "internal error in nexus-jobd: RuntimeError('boom')")
    assert h.store.rows["b"].status == "completed"


async def test_an_adopted_job_is_followed_to_its_end_under_our_claim() -> None:
    changed = Changed()
    executor = FakeExecutor(changed, reattach=True, detachable=True)
    async with dispatching(store=FakeStore(changed), executors={"localhost": executor}) as h:
        row = h.store.insert("a")
        row.status, row.worker_id, row.attempt, row.started_at = "executing", "w-dead", 1, 1000
        assert await h.dispatcher.adopt("w-dead", row.orphan())
        (process,) = await h.started(1)
        assert process.key == "a:1" and process.command is None  # reattached, not started again
        process.end(0)
        await h.recorded("a")
        assert not await h.dispatcher.adopt("w-dead", row.orphan())  # no longer that daemon's claim
    assert [claim for items in h.store.called("finish_many") for claim, _ in items] == [Claim("a", WORKER_ID, 1)]
    assert row.status == "completed"


async def test_a_stopping_dispatcher_adopts_nothing() -> None:
    async with dispatching(config(on_stop="drain", shutdown_grace_ms=60_000)) as h:
        h.store.insert("mine")
        (process,) = await h.started(1)
        row = h.store.insert("theirs")
        row.status, row.worker_id, row.attempt, row.started_at = "executing", "w-dead", 1, 1000
        h.stop.set()
        await h.changed.until(lambda: h.dispatcher._stop.stopping, what="the stop")
        assert not await h.dispatcher.adopt("w-dead", row.orphan())
        assert h.store.called("adopt") == [] and row.worker_id == "w-dead"
        process.end(0)


async def test_wakes_gather_reasons_until_the_loop_takes_them() -> None:
    wakes = Wakes()
    with anyio.fail_after(5):
        await wakes.wait(None)  # woken at start...
    assert wakes.take() == EVERYTHING  # ...for every duty once
    assert wakes.take() == Wake(0)
    wakes.put_back(Wake.CLAIMS_UNKNOWN)  # for the next pass, without waking the loop for it
    await wakes.wait(0.001)  # nothing woke it: the timeout ends the wait
    wakes.add(Wake.SLOT_FREED)
    wakes.add(Wake.REQUEUED)
    with anyio.fail_after(5):
        await wakes.wait(None)
    assert wakes.take() == Wake.CLAIMS_UNKNOWN | Wake.SLOT_FREED | Wake.REQUEUED
