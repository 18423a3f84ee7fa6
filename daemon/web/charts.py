"""The console's charts, from the rows themselves: jobs finished per bucket by status, queue depth, and pickup
latency and duration percentiles, over the last hours."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

BUCKETS = 60  # points per chart, whatever the span
MINUTE_MS = 60_000
FINAL = ("completed", "failed", "cancelled")


def _percentile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    values.sort()
    return values[min(len(values) - 1, int(q * len(values)))]


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stats(rows: Sequence[Sequence[Any]], *, now_ms: int, hours: int) -> dict[str, Any]:
    """`rows`: (created_at, run_after, started_at, completed_at, status) as Store.job_timings gives them."""
    span = hours * 3_600_000
    bucket = max(MINUTE_MS, -(-span // BUCKETS // MINUTE_MS) * MINUTE_MS)  # whole minutes
    start = now_ms - bucket * BUCKETS
    edges = [start + bucket * (i + 1) for i in range(BUCKETS)]
    finished = {status: [0] * BUCKETS for status in FINAL}
    pickup: list[list[int]] = [[] for _ in range(BUCKETS)]
    duration: list[list[int]] = [[] for _ in range(BUCKETS)]
    arrivals: list[int] = []
    departures: list[int] = []
    for created, run_after, started, completed, status in rows:
        created, run_after, started, completed = map(_int, (created, run_after, started, completed))
        if created is None:
            continue
        ready = max(created, run_after or created)
        left = started if started is not None else completed
        arrivals.append(ready)
        departures.append(left if left is not None else now_ms + 1)
        if started is not None and start <= started < now_ms:
            pickup[(started - start) // bucket].append(max(0, started - ready))
        if completed is not None and start <= completed < now_ms and status in FINAL:
            i = (completed - start) // bucket
            finished[status][i] += 1
            if started is not None:
                duration[i].append(max(0, completed - started))
    arrivals.sort()
    departures.sort()
    depth = [bisect.bisect_right(arrivals, t) - bisect.bisect_right(departures, t) for t in edges]
    return {"bucketMs": bucket, "start": start, "end": now_ms, "hours": hours, "finished": finished,
            "queueDepth": depth,
            "pickupMs": {"p50": [_percentile(b, 0.5) for b in pickup], "p95": [_percentile(b, 0.95) for b in pickup]},
            "durationMs": {"p50": [_percentile(b, 0.5) for b in duration],
                           "p95": [_percentile(b, 0.95) for b in duration]},
            "jobs": len(rows)}
