"""The daemon's periodic duties wake on one grid of the monotonic clock: the lease's renewal, node heartbeats, the
store's safety poll, the supervisor's status, the metrics' textfile. Periods that divide one another then wake
together, once, however long each duty's own work takes; an idle daemon wakes as often as its shortest period (the
lease's renewal), not once per duty. On a phone each wake-up of a sleeping CPU costs battery."""

from __future__ import annotations

import time

import anyio


def until_next(period_s: float) -> float:
    """Seconds to the next multiple of `period_s` on the monotonic clock that is at least a quarter period away (a
    timer that fired a little early, or a duty that overran, does not wake twice in a row)."""
    now = time.monotonic()
    at = (now // period_s + 1) * period_s
    if at - now < period_s / 4:
        at += period_s
    return at - now


async def sleep_until_next(period_s: float) -> None:
    await anyio.sleep(until_next(period_s))
