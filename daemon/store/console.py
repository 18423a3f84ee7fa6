"""The web console's reads (daemon.web): a paged, filtered job list, a followed job's output by byte offset, the
rows behind its charts, and the change source it listens to. A part of the job store, over the same driver."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from daemon.model import RawText
from daemon.store.base import ChangeSource
from daemon.store.driver import Driver

MARKER_ROOM = 64  # job_output_since: the output cap's marker starts at most this far before its TOTAL part
CAP_HEAD_SHARE = 4  # daemon.output.HEAD_SHARE: the marker lies in the first 1/4 of a column the cap cut
JOB_STATE = ("status", "attempt", "stdout_bytes", "stderr_bytes", "duration", "worker_id", "exit_code")


def job_state(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What job_output_since's `known` compares: a change of any of these is a change a follower must see."""
    return tuple(row.get(key) for key in JOB_STATE)


class ConsoleReads:
    """Mixed into the job store: what only the console asks."""

    _driver: Driver

    def row_watcher(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """Like `changes`, but for every change of a job or node row (output, status, heartbeats), by anyone."""
        return self._driver.row_changes(on_change, poll_s=poll_s)

    async def find_jobs(self, *, status: str | None, node_id: str | None, text: str | None,
                        before: tuple[int, str] | None, limit: int) -> list[dict[str, Any]]:
        """Newest first, without the output: filtered by status, node and `text` (in the command or the error,
        any case, or the start of the id), after the page that ended at `before` = (created_at, id)."""
        created, after_id = before if before is not None else (None, None)
        rows = await self._driver.read("find_jobs", {"status": status, "node_id": node_id, "text": text,
                                                     "limit": limit, "before_created": created,
                                                     "before_id": after_id})
        return rows.dicts()

    async def job_output_since(self, job_id: str | RawText, *, stdout_from: int, stderr_from: int, max_bytes: int,
                               known: tuple[Any, ...] | None = None,
                               hints: tuple[int, int] = (-1, -1)) -> dict[str, Any] | None:
        """A followed job: its row without the output, and per stream (`stdout_`, `stderr_` keys): `length`, the
        column's length in UTF-8 bytes; `chunk`, its bytes from `start` on (at most `max_bytes`): from the column
        offset `*_from`, or where `*_from` < 0, from the stream's byte -`*_from` counted back from the column's end
        (a column the output cap cut ends where the stream does); `around`, the bytes from `around_at` on that hold
        the cap's marker (daemon.output): at `hints` (where it was) if >= 0, else found by its " bytes of STREAM
        omitted; TOTAL bytes in all]" with the row's own TOTAL (none: None and -1). `known`: the row's `state`
        (job_state) as the caller last saw it: while the row still has it, only {"state": ...} is read."""
        key = self._driver.key(job_id)
        if known is not None:
            rows = await self._driver.read("job_state", {"id": key})
            state = tuple(rows[0]) if rows else None
            if state is None or state == known:
                return None if state is None else {"state": known}
        rows = await self._driver.read("job_output_since", {
            "id": key, "stdout_from": stdout_from, "stderr_from": stderr_from, "max": max_bytes,
            "room": MARKER_ROOM, "head_share": CAP_HEAD_SHARE, "stdout_hint": hints[0], "stderr_hint": hints[1]})
        found = rows.dicts()
        return found[0] | {"state": job_state(found[0])} if found else None

    async def job_timings(self, *, since_ms: int, limit: int) -> list[tuple[Any, ...]]:
        """When each recent job was queued, started and ended (the console's charts)."""
        return [tuple(row) for row in await self._driver.read("job_timings", {"since": since_ms, "limit": limit})]
