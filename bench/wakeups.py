"""Idle wake-ups: how often an idle daemon and its job keeper wake, over a minute with no jobs. On a phone every
wake-up of a sleeping CPU costs battery, so an idle daemon should wake no more often than its lease needs: one
renewal every third of lease_ttl_ms (12 a minute at the default 15 s).

Two figures per process: wake episodes (a burst of activity after at least EPISODE_GAP_MS of sleep: what wakes a
sleeping CPU), and thread wake-ups (the times a thread was put on a CPU: the third field of each thread's
/proc/PID/task/TID/schedstat, summed). Episodes are found by reading every thread's schedstat every SAMPLE_MS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h

SAMPLE_MS = 5
EPISODE_GAP_MS = 250


@dataclass
class Process:
    name: str
    pid: int
    runs_by_thread: dict[str, int] = field(default_factory=dict)  # thread name (tid) -> wake-ups over the window
    episodes: int = 0


def thread_runs(pid: int) -> dict[str, int]:
    """Thread "name (tid)" -> how many times it was put on a CPU so far."""
    runs = {}
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                name = Path(task.path, "comm").read_text().strip()
                runs[f"{name} ({task.name})"] = int(Path(task.path, "schedstat").read_text().split()[2])
    return runs


def watch(processes: list[Process], seconds: float) -> None:
    """Sample every SAMPLE_MS for `seconds`: count each process's episodes and its threads' wake-ups."""
    first = {p.pid: thread_runs(p.pid) for p in processes}
    last_total = {p.pid: sum(first[p.pid].values()) for p in processes}
    last_active = {p.pid: -1e9 for p in processes}
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        for p in processes:
            total = sum(thread_runs(p.pid).values())
            if total != last_total[p.pid]:
                if now - last_active[p.pid] >= EPISODE_GAP_MS / 1000:
                    p.episodes += 1
                last_active[p.pid], last_total[p.pid] = now, total
        time.sleep(SAMPLE_MS / 1000)
    for p in processes:
        p.runs_by_thread = {t: n - first[p.pid].get(t, 0) for t, n in thread_runs(p.pid).items()}


def main(args: argparse.Namespace) -> int:
    print(h.machine())
    with h.Workspace(args) as ws:
        config = ws.config(lease_ttl_ms=args.lease_ttl_ms, heartbeat_interval_ms=args.heartbeat_interval_ms,
                           poll_interval_ms=args.poll_interval_ms)
        with h.Daemon(ws, ws.database(), config) as daemon:
            time.sleep(args.settle_seconds)  # start-up's own work done (the first heartbeat, recovery, the sweep)
            processes = [Process("nexus-jobd", daemon.pid), Process("job keeper", daemon.keeper_pid)]
            watch(processes, args.seconds)
            daemon.check_alive()
    per_minute = 60 / args.seconds
    print(f"\nidle, no jobs, {args.seconds:.0f} s; lease_ttl_ms = {args.lease_ttl_ms}, heartbeat_interval_ms = "
          f"{args.heartbeat_interval_ms}, poll_interval_ms = {args.poll_interval_ms}; per minute:")
    h.print_table(("process / thread", "wake episodes", "thread wake-ups"), [
        row for p in processes for row in (
            (p.name, f"{p.episodes * per_minute:.1f}", f"{sum(p.runs_by_thread.values()) * per_minute:.0f}"),
            *((f"  {thread}", "", f"{runs * per_minute:.0f}") for thread, runs in sorted(p.runs_by_thread.items())))])
    needed = 60_000 / (args.lease_ttl_ms / 3)
    episodes = processes[0].episodes * per_minute
    ok = episodes <= needed + per_minute and processes[1].episodes == 0
    print(f"\nthe lease needs {needed:.0f} renewals a minute; the daemon woke {episodes:.1f} times, the keeper "
          f"{processes[1].episodes * per_minute:.1f}: target <= {needed:.0f} and 0  {h.verdict(ok)}")
    return 0 if ok else 1


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60, help="the idle window (default 60)")
    p.add_argument("--settle-seconds", type=float, default=15,
                   help="wait after start-up first (default 15: its once-only chores, such as the sweep at 10 s)")
    p.add_argument("--lease-ttl-ms", type=h.positive_int, default=15000)
    p.add_argument("--heartbeat-interval-ms", type=h.positive_int, default=15000)
    p.add_argument("--poll-interval-ms", type=h.positive_int, default=5000)
    h.add_common_args(p)
    return p


if __name__ == "__main__":
    h.run(main, parse_args())
