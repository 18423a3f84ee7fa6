"""daemon.outcome: how an attempt's end becomes the row's record, the one retry rule, and the retries' back-off."""

from __future__ import annotations

import random
import signal

import pytest

from daemon import outcome
from daemon.model import ExitStatus, JobResult, JobStatus, OutputSnapshot
from daemon.outcome import LEASE_LOST_ERROR, SHUTDOWN_ERROR, TIMEOUT_EXIT_CODE, Backoff

OUT = OutputSnapshot("some output", "", 11, 0)
BACKOFF = Backoff(base_ms=1000, max_ms=60_000)
NOW = 1_700_000_000_000


def ended(status: ExitStatus | int, *, stop_reason: str | None = None, attempt: int = 1, max_attempts: object = 1,
          timeout_ms: int | None = None) -> JobResult:
    code = status if isinstance(status, ExitStatus) else ExitStatus(status)
    return outcome.result_for(code, stop_reason=stop_reason, timeout_ms=timeout_ms, output=OUT, attempt=attempt,
                              max_attempts=max_attempts, backoff=BACKOFF, now_ms=NOW)  # type: ignore[arg-type]


def test_exit_0_completes_with_the_output() -> None:
    assert ended(0) == JobResult(JobStatus.COMPLETED, 0, None, OUT)


def test_a_nonzero_exit_fails_with_its_code_and_no_error_text() -> None:
    assert ended(3) == JobResult(JobStatus.FAILED, 3, None, OUT)


def test_a_signal_records_128_plus_n_and_names_the_signal() -> None:
    got = ended(ExitStatus.from_returncode(-signal.SIGKILL))
    assert (got.status, got.exit_code, got.error) == (JobStatus.FAILED, 137, "killed by signal 9 (SIGKILL)")
    assert ended(ExitStatus(128 + 77, 77)).error == "killed by signal 77 (unknown)"


def test_a_failure_retries_after_a_back_off_while_attempts_remain() -> None:
    got = ended(1, attempt=1, max_attempts=3)
    assert got.requeue and got.run_after is not None
    assert NOW + 500 <= got.run_after <= NOW + 1000  # attempt 1: half to all of base
    third = ended(1, attempt=2, max_attempts=3)
    assert third.requeue and third.run_after is not None and NOW + 1000 <= third.run_after <= NOW + 2000


@pytest.mark.parametrize(("attempt", "max_attempts"), [(3, 3), (4, 3), (1, 1), (1, 3.0), (1, "3"), (1, None),
                                                       (1, True)])
def test_no_retry_on_the_last_attempt_nor_for_a_max_attempts_that_is_no_whole_number(
        attempt: int, max_attempts: object) -> None:
    got = ended(1, attempt=attempt, max_attempts=max_attempts)
    assert (got.requeue, got.run_after) == (False, None)
    assert not outcome.may_retry(attempt, max_attempts)


def test_may_retry_counts_attempts_from_1() -> None:
    assert outcome.may_retry(1, 2) and outcome.may_retry(2, 3) and not outcome.may_retry(2, 2)


def test_a_timeout_records_124_with_the_limit_and_backs_off() -> None:
    got = ended(ExitStatus(143, 15), stop_reason="timeout", timeout_ms=1500, attempt=1, max_attempts=2)
    assert (got.status, got.exit_code) == (JobStatus.FAILED, TIMEOUT_EXIT_CODE)
    assert got.error == "timed out after 1.5s (timeout_ms=1500) and was killed"
    assert got.requeue and got.run_after is not None and NOW + 500 <= got.run_after <= NOW + 1000
    last = ended(ExitStatus(143, 15), stop_reason="timeout", timeout_ms=1500, attempt=2, max_attempts=2)
    assert (last.exit_code, last.requeue, last.run_after) == (124, False, None)


def test_a_shutdown_goes_back_to_the_queue_at_once_while_attempts_remain() -> None:
    got = ended(ExitStatus(143, 15), stop_reason="shutdown", attempt=1, max_attempts=2)
    assert (got.status, got.exit_code, got.error) == (JobStatus.FAILED, 143, SHUTDOWN_ERROR)
    assert (got.requeue, got.run_after) == (True, None)  # not the job's fault: no back-off
    last = ended(ExitStatus(143, 15), stop_reason="shutdown", attempt=2, max_attempts=2)
    assert (last.requeue, last.error) == (False, SHUTDOWN_ERROR)


def test_a_lost_lease_never_retries_here() -> None:
    got = ended(ExitStatus(143, 15), stop_reason="lease lost", attempt=1, max_attempts=5)
    assert (got.status, got.exit_code, got.error, got.requeue) == (JobStatus.FAILED, 143, LEASE_LOST_ERROR, False)


def test_a_cancelled_job_records_its_code_and_never_retries() -> None:
    got = ended(ExitStatus(143, 15), stop_reason="cancelled", attempt=1, max_attempts=5)
    assert got == JobResult(JobStatus.FAILED, 143, None, OUT)


def test_not_started() -> None:
    shutdown = outcome.not_started("shutdown", OUT)  # requeued whatever its attempts: it never had its turn
    assert (shutdown.status, shutdown.exit_code, shutdown.error, shutdown.requeue, shutdown.run_after) == (
        JobStatus.FAILED, None, SHUTDOWN_ERROR, True, None)
    lease = outcome.not_started("lease lost", OUT)
    assert (lease.error, lease.requeue) == (LEASE_LOST_ERROR, False)
    assert outcome.not_started("cancelled", OUT) == JobResult(JobStatus.FAILED, None, None, OUT)


def test_a_lost_connection_fails_without_a_code_or_retries_at_once() -> None:
    again = outcome.lost("connection dropped", OUT, attempt=1, max_attempts=2)
    assert (again.status, again.exit_code, again.error, again.requeue, again.run_after) == (
        JobStatus.FAILED, None, "connection dropped", True, None)
    assert not outcome.lost("connection dropped", OUT, attempt=2, max_attempts=2).requeue


def test_an_unreachable_node_requeues_without_counting_the_attempt() -> None:
    got = outcome.node_unreachable("no route to host", OUT, retry_at_ms=NOW + 5000)
    assert (got.requeue, got.uncount, got.run_after, got.exit_code) == (True, True, NOW + 5000, None)
    assert got.error == "not started yet: no route to host; it waits for the node"


@pytest.mark.parametrize(("code", "kept"), [(0, 0), (255, 255), (256, None), (-1, None), (2**40, None), (None, None)])
def test_an_unrecordable_result_fails_with_the_refusal_and_values_in_range(code: int | None, kept: int | None) -> None:
    big = JobResult(JobStatus.COMPLETED, code, None, OutputSnapshot("x" * 10, "y", 2**70, -5), requeue=True,
                    run_after=NOW, ended_monotonic=12.5)
    got = outcome.unrecordable(big, "integer out of range")
    assert (got.status, got.exit_code, got.requeue, got.run_after, got.ended_monotonic) == (
        JobStatus.FAILED, kept, False, None, 12.5)
    assert got.error == ("nexus-jobd could not record this attempt's result: integer out of range; the output is as "
                         "last written")
    assert got.output == OutputSnapshot(None, None, 2**62, 0)  # texts as last flushed, counts within 64 bits


def test_an_unrecordable_results_error_is_cut_to_1000_chars() -> None:
    got = outcome.unrecordable(JobResult(JobStatus.FAILED, 1, None, OUT), "x" * 5000)
    assert got.error is not None and len(got.error) == 1000


def test_backoff_doubles_up_to_the_cap_with_jitter_between_half_and_all() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 1000), (2, 2000), (3, 4000), (6, 32_000), (7, 60_000), (500, 60_000)]:
        delays = [BACKOFF.delay_ms(attempt, rng) for _ in range(200)]
        assert ceiling // 2 <= min(delays) and max(delays) <= ceiling, (attempt, min(delays), max(delays))
        assert max(delays) - min(delays) > ceiling // 4  # spread: jobs that failed together come back apart


def test_backoff_ends_of_the_jitter_range() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def uniform(self, a: float, b: float) -> float:
            assert (a, b) == (0.5, 1.0)
            return a + (b - a) * self.value

    assert BACKOFF.delay_ms(1, Fixed(0.0)) == 500 and BACKOFF.delay_ms(1, Fixed(1.0)) == 1000
    assert BACKOFF.delay_ms(10**9, Fixed(1.0)) == 60_000  # a huge attempt count neither overflows nor passes the cap
