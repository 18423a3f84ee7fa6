"""What the SQLite driver keeps for the day another program rewrites the file: the jobs and results written since
the WAL was last wholly in the main file (a rewrite would lose them with the WAL), the quarantine's report and the
results kept beside the file, and, at the next start, those applied to the file as it is then.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon import logging as log
from daemon.errors import DatabaseError
from daemon.model import Quarantine, now_ms
from daemon.store.driver import Rows, Tx
from daemon.store.sqlite import guard, rewrites

logger = log.get("store")


class Unsaved:
    """The jobs written since the WAL was last wholly copied into the main file, and the ends recorded since then
    as a report beside the file would keep them (rewrites.Pending): about the WAL's size at most, since it is
    checkpointed at 1000 frames. Once the file was found rewritten, where results go instead."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.jobs: set[str] = set()
        self.results: dict[str, dict[str, Any]] = {}
        self.kept: Quarantine | None = None

    def note(self, job_ids: Iterable[Any], *, settled: bool) -> None:
        """Jobs a write touched; `settled`: the WAL is wholly in the main file now, so nothing is at risk."""
        if settled:
            self.saved()
        else:
            self.jobs.update(i for i in job_ids if isinstance(i, str))

    def saved(self) -> None:
        self.jobs.clear()
        self.results.clear()

    def record(self, params: Sequence[Mapping[str, Any]], rows: Rows) -> None:
        """The finishes that took (`rows` of finished_claims, `params` of each finish), as a report keeps them."""
        by_id = {p["id"]: p for p in params}
        self.results.update((job_id, _kept_result(by_id[job_id], status, started_at, completed_at))
                            for job_id, status, started_at, completed_at
                            in rows.each("id", "status", "started_at", "completed_at"))

    def set_aside(self, reason: str, *, lost: bool) -> Quarantine:
        """Move our WAL aside (`<db>-wal.<suffix>`) so that no program replays it onto the rewritten file; what
        it holds is `lost` unless it was all in the main file."""
        suffix = rewrites.new_suffix(self.path)
        moved = guard.set_aside(self.path, suffix, held_only=True)
        self.kept = Quarantine(reason, guard.rewritten_message(self.path, reason), moved,
                               sorted(self.jobs) if lost else [], rewrites.report_path(self.path, suffix),
                               rewrites.results_path(self.path, suffix))
        return self.kept

    def report(self, kept: Quarantine, results: list[dict[str, Any]], *, running: Sequence[Mapping[str, Any]],
               worker: Mapping[str, Any]) -> Quarantine:
        """The report beside the file (what was seen, which attempts ran) and the results only the WAL held. The
        WAL is aside already: a full disk may keep these from being written, not that."""
        try:
            rewrites.write_report(kept.report, {
                "message": kept.message, "reason": kept.reason, "detected_at": now_ms(), "worker": dict(worker),
                "worker_id": worker.get("worker_id"), "wal_set_aside": [str(p) for p in kept.set_aside],
                "not_recorded": kept.unrecorded, "running": sorted(str(job["id"]) for job in running),
                "attempts": [dict(job) for job in running], "results": str(kept.results)})
            self.keep(results)
        except OSError as e:
            logger.error("job.results_not_kept", path=str(kept.report), error=str(e),
                         jobs=[r["id"] for r in results], consequence="what ran them keeps them meanwhile")
            return dataclasses.replace(kept, kept=False)
        self.results.clear()
        return kept

    def keep(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Results of attempts that ended after the quarantine, appended beside the file (OSError if they cannot)."""
        if self.kept is None:
            raise DatabaseError(f"{self.path}: results are kept beside the file only once it was found rewritten")
        rewrites.write_private(self.kept.results, "".join(json.dumps(dict(row)) + "\n" for row in rows), append=True)


async def apply_pending(tx: Tx, pending: rewrites.Pending) -> list[dict[str, Any]]:
    """Inside a transaction: each kept result recorded (unless the row moved on), then each attempt that was
    running and whose end nobody kept claimed again under its dead daemon, for recovery to settle."""
    actions = []
    ended = set()
    for result in pending.results:
        if (params := _applied_params(result)) is None:
            continue
        ended.add((params["id"], result["attempt"]))
        rows = await tx.rows("apply_kept_result", params)
        actions.append({"job_id": params["id"], "attempt": params["attempt"],
                        "action": f"recorded {rows.first('status')}" if rows else "left as it is (the row moved on)"})
    worker = pending.data.get("worker")
    attempts = [a for a in pending.data.get("attempts") or [] if isinstance(a, dict)
                and (a.get("id"), a.get("attempt")) not in ended]
    if attempts and isinstance(worker, dict) and isinstance(worker.get("worker_id"), str):
        await tx.execute("restore_worker", {
            "id": worker["worker_id"], "host": str(worker.get("host")), "boot_id": worker.get("boot_id"),
            "pid": worker.get("pid") or 0, "pid_start": worker.get("pid_start"),
            "started_at": pending.data.get("detected_at") or 0})
        for a in attempts:
            rows = await tx.rows("restore_claim", {
                "id": a.get("id"), "attempt": a.get("attempt"), "worker_id": worker["worker_id"],
                "started_at": a.get("started_at"), "pid": a.get("pid"), "pid_start": a.get("pid_start")})
            actions.append({"job_id": a.get("id"), "attempt": a.get("attempt"),
                            "action": "claimed again for recovery" if rows else "left as it is (the row moved on)"})
    return actions


def _kept_result(params: Mapping[str, Any], status: Any, started_at: Any, ended_at: Any) -> dict[str, Any]:
    """A finish as a report beside the file keeps it (rewrites.Pending): what the row became (`status`: queued
    again, or final) and when, from the row just written."""
    keys = ("id", "worker_id", "attempt", "uncount", "exit_code", "error", "stdout", "stderr", "stdout_bytes",
            "stderr_bytes", "run_after")
    return {k: params[k] for k in keys} | {"status": status, "started_at": started_at, "ended_at": ended_at}


def _applied_params(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """A kept result as apply_kept_result's parameters; None if it is not one (a line edited by hand)."""
    def number(key: str) -> int | None:
        value = result.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def text(key: str) -> str | None:
        value = result.get(key)
        return value if isinstance(value, str) else None

    status, attempt = result.get("status"), number("attempt")
    if status not in ("queued", "completed", "failed", "cancelled") or attempt is None or text("id") is None:
        return None
    final = status != "queued"
    return {"id": text("id"), "status": status, "attempt": attempt - (1 if result.get("uncount") else 0),
            "worker_id": text("worker_id"), "exit_code": number("exit_code"), "error": text("error"),
            "stdout": text("stdout"), "stderr": text("stderr"), "stdout_bytes": number("stdout_bytes"),
            "stderr_bytes": number("stderr_bytes"), "run_after": None if final else number("run_after"),
            "started_at": number("started_at") if final else None, "ended_at": number("ended_at") if final else None}
