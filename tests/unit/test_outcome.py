"""outcome.result_for on a SIGKILL: a stranger's is named (on Android: the phantom process killer) and retried as any
failure; one that nexus-jobd sent (for this daemon or, through the keeper, another), or the kernel at a cpu_seconds
limit, or one on an SSH node (whose signals this host does not see) is not called a stranger's."""

from __future__ import annotations

import signal

import pytest

from daemon import outcome
from daemon.model import ExitStatus, JobStatus, OutputSnapshot

KILLED = 128 + signal.SIGKILL
NOTHING = OutputSnapshot(None, None, 0, 0)


def _result(status: ExitStatus, kills: outcome.Kills | None, max_attempts: int = 1) -> tuple[str | None, bool, bool]:
    result = outcome.result_for(status, stop_reason=None, timeout_ms=None, output=NOTHING, attempt=1,
                                max_attempts=max_attempts, backoff=outcome.Backoff(1000, 2000), now_ms=0, kills=kills)
    assert (result.status, result.exit_code) == (JobStatus.FAILED, KILLED)
    return result.error, result.killed_outside, result.requeue


def test_a_stranger_sigkill_on_android_names_the_phantom_process_killer_and_is_retried_when_allowed() -> None:
    error, outside, requeue = _result(ExitStatus(KILLED, signal.SIGKILL, cpu_s=0.5),
                                      outcome.Kills(local=True, android=True, cpu_seconds=60), max_attempts=2)
    assert outside and requeue
    assert error is not None and error.startswith("killed by signal 9 (SIGKILL), which nexus-jobd did not send")
    assert "phantom process killer" in error and "Disable child process restrictions" in error


@pytest.mark.parametrize(("status", "kills", "error"), [
    (ExitStatus(KILLED, signal.SIGKILL, signalled=signal.SIGKILL), outcome.Kills(local=True, android=True),
     "killed by signal 9 (SIGKILL)"),  # sent by nexus-jobd (this daemon, or another through the keeper)
    (ExitStatus(KILLED, signal.SIGKILL), outcome.Kills(local=False, android=True), "killed by signal 9 (SIGKILL)"),
    (ExitStatus(KILLED, signal.SIGKILL), None, "killed by signal 9 (SIGKILL)"),
    (ExitStatus(KILLED, signal.SIGKILL, cpu_s=2.01), outcome.Kills(local=True, cpu_seconds=1),
     "killed by signal 9 (SIGKILL) at its cpu_seconds limit (1 s of CPU)"),
    (ExitStatus(KILLED, signal.SIGKILL), outcome.Kills(local=True, cpu_seconds=1),  # a keeper that did not say
     "killed by signal 9 (SIGKILL) at its cpu_seconds limit (1 s of CPU)"),
], ids=["sent here", "ssh node", "unknown", "cpu limit", "cpu limit, cpu time unknown"])
def test_a_kill_that_is_explained_is_not_a_strangers(status: ExitStatus, kills: outcome.Kills | None,
                                                    error: str) -> None:
    assert _result(status, kills)[:2] == (error, False)


def test_a_sigkill_below_the_cpu_limit_is_a_strangers_off_android() -> None:
    error, outside, requeue = _result(ExitStatus(KILLED, signal.SIGKILL, signalled=signal.SIGTERM, cpu_s=0.2),
                                      outcome.Kills(local=True, cpu_seconds=1))
    assert outside and not requeue
    assert error is not None and "OOM killer" in error and "phantom" not in error
