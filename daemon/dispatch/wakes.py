"""Why the dispatcher's loop wakes: explicit reasons, each bringing its own duties, gathered until the loop looks."""

from __future__ import annotations

import asyncio
import enum


class Wake(enum.Flag):
    QUEUE_CHANGED = enum.auto()  # another program wrote (new rows, cancels, dependencies), or the store's safety poll
    NODES_CHANGED = enum.auto()  # a node's health changed, a heartbeat passed, the config was reloaded
    SLOT_FREED = enum.auto()  # a job's process ended while rows waited for a slot
    JOB_RECORDED = enum.auto()  # an end was recorded while queued rows depend on others: they may start or fail
    SCHEDULE_CHANGED = enum.auto()  # a retry waits for its run_after: the next due time moved
    RUN_AFTER_DUE = enum.auto()  # the earliest run_after came due
    REQUEUED = enum.auto()  # recovery put rows back in the queue
    CLAIMS_UNKNOWN = enum.auto()  # a claim failed with a database error: it may have taken rows all the same


EVERYTHING = Wake(sum(w.value for w in Wake))  # at start: every duty once
# The duties, and the reasons that call for each.
NOTICE_CANCELS = Wake.QUEUE_CHANGED
FIND_CYCLES = Wake.QUEUE_CHANGED  # only another program's rows can make a cycle
FAIL_UNRUNNABLE = Wake.QUEUE_CHANGED | Wake.NODES_CHANGED | Wake.JOB_RECORDED
CLAIM = (Wake.QUEUE_CHANGED | Wake.NODES_CHANGED | Wake.SLOT_FREED | Wake.JOB_RECORDED | Wake.RUN_AFTER_DUE
         | Wake.REQUEUED)
RESCHEDULE = Wake.QUEUE_CHANGED | Wake.RUN_AFTER_DUE | Wake.SCHEDULE_CHANGED


class Wakes:
    """The reasons given since the loop last took them, and the event that wakes it. Anything may add a reason
    (callbacks of the store, health, recovery, the jobs' tasks); only the loop takes them."""

    def __init__(self) -> None:
        self._pending = EVERYTHING
        self._event = asyncio.Event()
        self._event.set()

    def add(self, reason: Wake) -> None:
        self._pending |= reason
        self._event.set()

    def ring(self) -> None:
        """Wake the loop with no new reason (a job ended, a stop was asked for): it looks at what it waits for."""
        self._event.set()

    def take(self) -> Wake:
        reasons, self._pending = self._pending, Wake(0)
        return reasons

    def put_back(self, reasons: Wake) -> None:
        """Duties that could not be done (the database said no): for the next pass."""
        self._pending |= reasons

    async def wait(self, timeout_s: float | None) -> None:
        """Until woken or `timeout_s` passed. A timer handle rather than a cancel scope: this runs at every wake-up,
        and idle CPU counts on a phone."""
        if timeout_s is not None:
            handle = asyncio.get_running_loop().call_later(max(0.0, timeout_s), self._event.set)
        try:
            await self._event.wait()
        finally:
            if timeout_s is not None:
                handle.cancel()
            self._event.clear()
