"""How an attempt ended -> what the row records: status, exit code, error, and whether to try again when.

Conventions: a timeout records 124 (as coreutils `timeout`), a signal 128+N; retries back off exponentially
with jitter; jobs interrupted by the daemon itself (shutdown) go back to the queue at once; a SIGKILL nobody here
sent is named as such (on Android: the phantom process killer, and its fix).
"""

from __future__ import annotations

import dataclasses
import random
import signal
from dataclasses import dataclass

from daemon.model import ExitStatus, JobResult, JobStatus, OutputSnapshot

TIMEOUT_EXIT_CODE = 124
SHUTDOWN_ERROR = "daemon shut down while the job was running"
LEASE_LOST_ERROR = "this daemon lost its lease (another daemon took the job over)"


@dataclass(frozen=True)
class Backoff:
    base_ms: int
    max_ms: int

    def delay_ms(self, attempt: int, rng: random.Random | None = None) -> int:
        """Attempt 1 failed -> about base, then 2x each time, capped; a random half to full, so retries of
        many jobs that failed together do not come back together."""
        ceiling = min(self.max_ms, self.base_ms * 2 ** min(attempt - 1, 40))
        return int(ceiling * (rng or random).uniform(0.5, 1.0))


def may_retry(attempt: int, max_attempts: object) -> bool:
    """The one retry rule: attempts are counted from 1, and the row allows `max_attempts` (another program may have
    stored anything there: only a whole number allows a retry)."""
    return isinstance(max_attempts, int) and not isinstance(max_attempts, bool) and attempt < max_attempts


@dataclass(frozen=True)
class Kills:
    """What tells a SIGKILL nobody here sent from one of ours: the job ran on this host (its executor saw every signal
    nexus-jobd sent it), on Android or not, under which cpu_seconds limit (the kernel's SIGKILL past it is ours)."""

    local: bool
    android: bool = False
    cpu_seconds: int | None = None


OUTSIDE_KILL = "which nexus-jobd did not send (no timeout, cancel, stop or limit of its own)"
PHANTOM_FIX = ("most likely Android's phantom process killer, which kills an app's child processes beyond 32 in all, "
               "or one that uses much CPU in the background (Android 12 and later); the fix is in the README, "
               "\"Android (Termux)\", \"The phantom process killer\": `adb shell device_config put activity_manager "
               "max_phantom_processes 2147483647`, or on Android 14 and later the developer option \"Disable child "
               "process restrictions\"")
STRANGER = ("another process killed it: most often the kernel's OOM killer (see `dmesg` or `journalctl -k`), or a "
            "person's kill -9")


def _signal_error(status: ExitStatus, kills: Kills | None) -> tuple[str | None, bool]:
    """The reason a signal's death gives the row, and whether a stranger's SIGKILL ended the job."""
    if status.signal is None:
        return None, False
    try:
        name = signal.Signals(status.signal).name
    except ValueError:
        name = "unknown"
    error = f"killed by signal {status.signal} ({name})"
    if status.signal != signal.SIGKILL or kills is None or not kills.local or status.signalled == signal.SIGKILL:
        return error, False
    if kills.cpu_seconds is not None and (status.cpu_s is None or status.cpu_s >= kills.cpu_seconds):
        return f"{error} at its cpu_seconds limit ({kills.cpu_seconds} s of CPU)", False
    return f"{error}, {OUTSIDE_KILL}: {PHANTOM_FIX if kills.android else STRANGER}", True


def result_for(status: ExitStatus, *, stop_reason: str | None, timeout_ms: int | None, output: OutputSnapshot,
               attempt: int, max_attempts: int, backoff: Backoff, now_ms: int, kills: Kills | None = None
               ) -> JobResult:
    """The row's record of an attempt whose process ran and ended with `status`; `kills` says whether an unexplained
    SIGKILL can be told apart (a local job's) and how it is explained."""
    retry = may_retry(attempt, max_attempts)
    if stop_reason == "timeout":
        error = f"timed out after {(timeout_ms or 0) / 1000:g}s (timeout_ms={timeout_ms}) and was killed"
        return _failed(TIMEOUT_EXIT_CODE, error, output, retry, now_ms + backoff.delay_ms(attempt))
    if stop_reason == "shutdown":  # interrupted by us: not the job's fault, so no back-off
        return _failed(status.code, SHUTDOWN_ERROR, output, retry, None)
    if stop_reason == "lease lost":
        return _failed(status.code, LEASE_LOST_ERROR, output, False, None)
    if stop_reason == "cancelled":  # the row stays `cancelled` whatever status we pass
        return JobResult(JobStatus.FAILED, status.code, None, output)
    if status.code == 0:
        return JobResult(JobStatus.COMPLETED, 0, None, output)
    reason, outside = _signal_error(status, kills)
    result = _failed(status.code, reason, output, retry, now_ms + backoff.delay_ms(attempt))
    return dataclasses.replace(result, killed_outside=True) if outside else result


def not_started(stop_reason: str, output: OutputSnapshot) -> JobResult:
    """Stopped before its process was started (while the engine was checked): nothing ran. A cancelled row stays
    cancelled; on shutdown it goes back to the queue whatever its attempts, as it never had its turn."""
    if stop_reason == "shutdown":
        return _failed(None, SHUTDOWN_ERROR, output, True, None)
    if stop_reason == "lease lost":
        return _failed(None, LEASE_LOST_ERROR, output, False, None)
    return JobResult(JobStatus.FAILED, None, None, output)


def node_unreachable(error: str, output: OutputSnapshot, *, retry_at_ms: int, pooled: bool = False) -> JobResult:
    """Its node did not answer, so nothing was started: back to the queue until the node is worth trying again,
    whatever max_attempts says, and the claim does not count as an attempt (the next one has the same number). A
    pool's row does not wait for that node: it goes back at once, for another member."""
    if pooled:
        return JobResult(JobStatus.FAILED, None, f"not started yet: {error}; it goes to another member", output,
                         requeue=True, uncount=True, node_retry_at=retry_at_ms)
    return JobResult(JobStatus.FAILED, None, f"not started yet: {error}; it waits for the node", output,
                     requeue=True, run_after=retry_at_ms, uncount=True, node_retry_at=retry_at_ms)


def lost(error: str, output: OutputSnapshot, *, attempt: int, max_attempts: int) -> JobResult:
    """The node's connection dropped mid-job: failed (no exit code is known), or back to the queue at once."""
    return _failed(None, error, output, may_retry(attempt, max_attempts), None)


# The largest byte count any column of ours holds (both backends' 64-bit integers, with room to add to it).
_MAX_COUNT = 2**62


def unrecordable(result: JobResult, refusal: str) -> JobResult:
    """What the row records when the database refuses the values of `result` (a text too big, a count out of
    range): failed, with the refusal as the reason; its texts as the last flush left them, its counts in range."""
    out = result.output
    code = result.exit_code if result.exit_code is not None and 0 <= result.exit_code <= 255 else None
    error = f"nexus-jobd could not record this attempt's result: {refusal}; the output is as last written"
    return JobResult(JobStatus.FAILED, code, error[:1000],
                     OutputSnapshot(None, None, min(max(out.stdout_bytes, 0), _MAX_COUNT),
                                    min(max(out.stderr_bytes, 0), _MAX_COUNT)),
                     ended_monotonic=result.ended_monotonic)


def _failed(code: int | None, error: str | None, output: OutputSnapshot, retry: bool,
            run_after: int | None) -> JobResult:
    return JobResult(JobStatus.FAILED, code, error, output, requeue=retry, run_after=run_after if retry else None)
