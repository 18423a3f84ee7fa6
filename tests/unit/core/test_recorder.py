"""daemon.dispatch.recorder on an in-memory store: ends written in batches, writes retried while the database is
away, a refused batch written row by row (the refused row with a result it can hold), what ran a job let go only
once its end is settled in the file, and results kept beside a file another program rewrote."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import anyio
import pytest

from daemon import outcome
from daemon.dispatch.recorder import RECORD_GATHER_S, SETTLE_WHEN_IDLE_S, Finished, Recorder
from daemon.model import Claim, JobResult, JobStatus, OutputSnapshot, Quarantine
from daemon.output import JobOutput
from daemon.runner import JobRunner, RunningJob
from daemon.store import DbUnavailable, Store
from tests.unit.core.conftest import Sleeps
from tests.unit.core.fakes import WORKER, WORKER_ID, Changed, FakeHooks, FakeProcess, FakeStore, config, result

pytestmark = pytest.mark.anyio


class Bench:
    """A Recorder on a FakeStore, with jobs claimed and ended as the dispatcher hands them over."""

    def __init__(self) -> None:
        self.changed = Changed()
        self.store = FakeStore(self.changed)
        self.running: dict[tuple[str, int], RunningJob] = {}
        self.processes: dict[str, FakeProcess] = {}
        self.hooks = FakeHooks()
        self.batches: list[list[Finished]] = []
        self.rewritten: list[Quarantine] = []
        self.recorder = Recorder(config(), cast(Store, self.store), self.running, JobRunner.process_ref, self.hooks,
                                 WORKER, self.batches.append, self.rewritten.append)

    def run(self, job_id: str) -> RunningJob:
        """A row claimed by this daemon and running: its process started (and not yet ended)."""
        row = self.store.insert(job_id)
        row.status, row.worker_id, row.attempt, row.started_at = "executing", WORKER_ID, 1, 1000
        running = RunningJob(Claim(job_id, WORKER_ID, 1), "localhost", "bash", JobOutput(1 << 20), 1000)
        running.process = self.processes[job_id] = FakeProcess(self.changed, None, f"{job_id}:1", lambda _: None,
                                                                lambda _: None, detachable=False)
        self.running[(job_id, 1)] = running
        return running

    def end(self, job_id: str, res: JobResult | None = None) -> JobResult:
        """Its process ended: the dispatcher hands its result over."""
        running = self.running[(job_id, 1)]
        running.holds_slot = False
        res = res or result()
        self.recorder.finished(self.store.rows[job_id].claimed(), running, res)
        return res

    def finished(self, *job_ids: str) -> list[Finished]:
        return [(self.store.rows[job_id].claimed(), self.running[(job_id, 1)], result()) for job_id in job_ids]

    async def recorded(self, *job_ids: str) -> None:
        await self.changed.until(lambda: not any((job_id, 1) in self.running for job_id in job_ids),
                                 what=f"{job_ids} recorded")


@pytest.fixture
async def bench(sleeps: Sleeps) -> AsyncIterator[Bench]:
    """The bench with its record loop running (and its sleeps taken at once)."""
    bench = Bench()
    async with anyio.create_task_group() as tg:
        tg.start_soon(bench.recorder.record_loop)
        yield bench
        tg.cancel_scope.cancel()


def written(store: FakeStore) -> list[list[tuple[str, JobResult]]]:
    return [[(claim.job_id, res) for claim, res in items] for items in store.called("finish_many")]


async def test_ends_handed_over_together_are_written_in_one_transaction_under_their_claims(bench: Bench) -> None:
    for job_id in "abc":
        bench.run(job_id)
    results = [bench.end(job_id, result(exit_code=i)) for i, job_id in enumerate("abc")]
    await bench.recorded(*"abc")
    assert bench.store.called("finish_many") == [
        [(Claim(job_id, WORKER_ID, 1), res) for job_id, res in zip("abc", results, strict=True)]]
    assert [[job.id for job, _, _ in batch] for batch in bench.batches] == [["a", "b", "c"]]
    assert [bench.store.rows[job_id].status for job_id in "abc"] == ["completed"] * 3
    assert bench.hooks.finished == [("localhost", "completed")] * 3
    assert all(bench.processes[job_id].forgotten == [True] for job_id in "abc")  # settled: let go, removed


async def test_an_end_waits_a_moment_for_others_about_to_end(sleeps: Sleeps, bench: Bench) -> None:
    """While other jobs run, a lone end waits RECORD_GATHER_S: what ends meanwhile goes in the same write."""
    bench.run("a")
    bench.run("b")
    sleeps.during[RECORD_GATHER_S] = lambda: bench.end("b")
    bench.end("a")
    await bench.recorded("a", "b")
    assert [[job_id for job_id, _ in call] for call in written(bench.store)] == [["a", "b"]]


async def test_a_database_error_is_retried_with_a_growing_back_off(sleeps: Sleeps, bench: Bench) -> None:
    bench.store.fail("finish_many", DbUnavailable("disk I/O error"), DbUnavailable("disk I/O error"))
    bench.run("a")
    res = bench.end("a")
    await bench.recorded("a")
    assert written(bench.store) == [[("a", res)]] * 3
    assert [delay for delay in sleeps.taken if delay != RECORD_GATHER_S] == [0.1, 0.2]
    assert bench.hooks.db_errors == 2 and bench.store.rows["a"].status == "completed"


def refuse_job(job_id: str, *, even_the_fallback: bool = False) -> Callable[[Claim, JobResult], str | None]:
    def refuse(claim: Claim, res: JobResult) -> str | None:
        if claim.job_id == job_id and (even_the_fallback or res.error is None):
            return "integer out of range"
        return None

    return refuse


async def test_a_refused_batch_is_written_row_by_row_and_the_refused_row_gets_a_result_it_can_hold(
        bench: Bench, logs: list[dict[str, Any]]) -> None:
    bench.store.refuse = refuse_job("bad")
    bench.run("good")
    bench.run("bad")
    good = bench.end("good")
    bad = bench.end("bad", result(exit_code=2**40, output=OutputSnapshot("x", "", 2**70, 0)))
    await bench.recorded("good", "bad")
    fallback = outcome.unrecordable(bad, "integer out of range")
    assert written(bench.store) == [[("good", good), ("bad", bad)], [("good", good)], [("bad", bad)],
                                    [("bad", fallback)]]
    row = bench.store.rows["bad"]
    assert (row.status, row.exit_code, row.error, row.stdout_bytes) == ("failed", None, fallback.error, 2**62)
    assert bench.store.rows["good"].status == "completed"
    assert [e["job_id"] for e in logs if e["event"] == "job.result_refused"] == ["bad"]
    assert bench.processes["bad"].forgotten == [True]


async def test_a_row_that_refuses_even_the_fallback_is_left_as_it_is(bench: Bench, logs: list[dict[str, Any]]) -> None:
    bench.store.refuse = refuse_job("bad", even_the_fallback=True)
    bench.run("bad")
    bench.end("bad")
    await bench.recorded("bad")
    assert len(written(bench.store)) == 3  # the batch, the row alone, its fallback: never retried for ever
    assert bench.store.rows["bad"].status == "executing"
    assert bench.processes["bad"].forgotten == [False]  # not recorded: what it left stays where it ran
    assert [e["event"] for e in logs if e["event"].startswith("job.")] == [
        "job.result_refused", "job.unrecordable", "job.claim_lost"]


async def test_an_end_only_in_the_wal_is_kept_where_it_ran_until_the_daemon_is_idle(sleeps: Sleeps,
                                                                                     bench: Bench) -> None:
    bench.store.settled, bench.store.settle_on_idle = False, True
    bench.run("a")
    bench.run("b")  # still running: the daemon is not idle
    bench.end("a")
    await bench.recorded("a")
    assert bench.processes["a"].forgotten == []  # a rewrite of the file would lose this end: the keeper keeps it
    async with anyio.create_task_group() as tg:
        tg.start_soon(bench.recorder.settle_loop)
        await bench.changed.until(lambda: sleeps.taken.count(SETTLE_WHEN_IDLE_S) >= 3, what="the settle loop")
        assert bench.store.called("idle") == [] and bench.processes["a"].forgotten == []  # busy: not settled now
        del bench.running[("b", 1)]  # now idle
        await bench.changed.until(lambda: bench.processes["a"].forgotten, what="a let go")
        tg.cancel_scope.cancel()
    assert bench.store.called("idle") == [None] and bench.processes["a"].forgotten == [True]


async def test_unsettled_ends_go_once_a_later_write_finds_the_store_settled(bench: Bench) -> None:
    bench.store.settled = False
    bench.run("a")
    bench.run("b")
    bench.end("a")
    await bench.recorded("a")
    assert bench.processes["a"].forgotten == []
    bench.store.settled = True  # the WAL was checkpointed meanwhile
    bench.end("b")
    await bench.recorded("b")
    assert bench.processes["a"].forgotten == [True] and bench.processes["b"].forgotten == [True]


async def test_idle_settles_and_lets_go_only_what_the_store_says_is_settled(bench: Bench) -> None:
    bench.store.settled, bench.store.settle_on_idle = False, False
    bench.run("a")
    bench.end("a")
    await bench.recorded("a")
    await bench.recorder.idle()
    assert bench.store.called("idle") == [None] and bench.processes["a"].forgotten == []
    bench.store.settle_on_idle = True
    await bench.recorder.idle()
    assert bench.processes["a"].forgotten == [True]


async def test_a_job_that_ends_after_the_rewrite_is_kept_beside_the_file(bench: Bench) -> None:
    bench.store.unwritable = "the file was replaced"
    bench.run("a")
    bench.end("a", result(exit_code=3, status=JobStatus.FAILED))
    await bench.recorded("a")
    assert [row["id"] for row in bench.store.kept] == ["a"]
    kept = bench.store.kept[0]
    assert (kept["status"], kept["exit_code"], kept["attempt"], kept["worker_id"]) == ("failed", 3, 1, WORKER_ID)
    assert bench.processes["a"].forgotten == [True] and bench.store.rows["a"].status == "executing"
    assert bench.batches == [[]]


async def test_an_end_written_into_the_wal_set_aside_is_kept_beside_the_file_too(bench: Bench) -> None:
    bench.store.after_finish = lambda: setattr(bench.store, "unwritable", "the file was replaced")
    bench.run("a")
    bench.end("a", result(requeue=True, status=JobStatus.FAILED, exit_code=1, run_after=5))
    await bench.recorded("a")
    assert [(row["id"], row["status"], row["run_after"], row["ended_at"]) for row in bench.store.kept] == [
        ("a", "queued", 5, None)]


async def test_results_that_cannot_be_kept_leave_what_ran_them_in_place(bench: Bench,
                                                                        logs: list[dict[str, Any]]) -> None:
    bench.store.keep_error = OSError("No space left on device")
    bench.run("a")
    bench.run("b")
    bench.recorder.keep_unrecorded(bench.finished("a", "b"))
    assert bench.processes["a"].forgotten == [False] and bench.processes["b"].forgotten == [False]
    assert bench.running == {} and bench.batches == [[]]
    assert [e["jobs"] for e in logs if e["event"] == "job.results_not_kept"] == [["a", "b"]]


async def test_leaving_a_rewritten_file_reports_the_running_attempts_and_lets_go_of_kept_ends(bench: Bench) -> None:
    bench.store.settled = False
    bench.run("a")
    bench.end("a")
    await bench.recorded("a")
    bench.run("b")
    bench.store.unwritable = "the file was replaced"
    quarantine = await bench.recorder.leave_rewritten()
    assert bench.rewritten == [quarantine] and bench.recorder.quarantine is quarantine
    (report,) = bench.store.quarantined
    assert [(job["id"], job["attempt"], job["node_id"]) for job in report["running"]] == [("b", 1, "localhost")]
    assert report["worker"] == WORKER
    assert bench.processes["a"].forgotten == [True]  # its end is kept beside the file now
    assert bench.processes["b"].forgotten == []


async def test_output_is_flushed_in_one_write_and_a_refused_row_is_not_flushed_again() -> None:
    bench = Bench()
    for job_id in ("a", "b"):
        running = bench.run(job_id)
        running.output.stdout.feed(b"hello " + job_id.encode())
    bench.store.refuse_output = lambda claim: "string too long" if claim.job_id == "b" else None
    await bench.recorder.flush_once()
    calls = bench.store.called("write_outputs")
    assert [[claim.job_id for claim, _, _ in call] for call in calls] == [["a", "b"], ["a"], ["b"]]
    assert bench.store.rows["a"].stdout == "hello a" and bench.store.rows["b"].stdout is None
    assert bench.running[("b", 1)].flush_refused and not bench.running[("a", 1)].flush_refused
    for job_id in ("a", "b"):
        bench.running[(job_id, 1)].output.stdout.feed(b" more")
    await bench.recorder.flush_once()
    assert [[claim.job_id for claim, _, _ in call] for call in bench.store.called("write_outputs")[3:]] == [["a"]]
