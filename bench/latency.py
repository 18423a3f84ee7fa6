"""Pick-up latency and idle CPU: another process inserts rows one at a time at random moments into an idle daemon;
the latency of a row is `started_at - created_at` (created_at is taken by the inserter right before its INSERT).

Baseline in the same run: a plain sqlite3 connection polling `PRAGMA data_version` every 20 ms that claims the
queued rows when it changes, recording its own pick-up time as started_at (it runs nothing).
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import _harness as h

P50_TARGET_MS = 5
P99_TARGET_MS = 20
IDLE_TARGET_PCT = 0.5
POLL_INTERVAL_S = 0.02
SCRIPT = str(Path(__file__).resolve())


@dataclass
class Result:
    name: str
    latencies_ms: list[int]
    idle_pct: tuple[float, float]  # of one core: (ticks, schedstat)

    def pct(self, p: float) -> float:
        return h.percentile(self.latencies_ms, p)


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=h.positive_int, default=200, help="rows to insert (default 200)")
    p.add_argument("--gap-ms", type=int, nargs=2, default=(20, 100), metavar=("MIN", "MAX"),
                   help="random pause before each insert (default 20 100)")
    p.add_argument("--idle-seconds", type=float, default=10, help="idle CPU sampling window (default 10)")
    p.add_argument("--synchronous", choices=("FULL", "NORMAL"), default="FULL",
                   help="the inserter's PRAGMA synchronous (default FULL, SQLite's default for a new connection)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random pauses (default 1)")
    h.add_common_args(p)
    p.add_argument("--role", choices=("inserter", "poller"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--db", metavar="URL", help="a postgresql:// URL: compare nexus-jobd on PostgreSQL, on SQLite and "
                   "procrastinate instead (throwaway databases are made on that server)")
    return p


# -- the other processes ----------------------------------------------------------------------------------

def role_inserter(args: argparse.Namespace) -> int:
    """Internal role: INSERT `rows` rows one at a time, each after a random pause; created_at right before."""
    rng = random.Random(args.seed)
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    conn.execute(f"PRAGMA synchronous = {args.synchronous}")
    for _ in range(args.rows):
        time.sleep(rng.uniform(*args.gap_ms) / 1000)
        conn.execute(h.INSERT_JOB, (str(uuid.uuid4()), "bash", "true", h.now_ms()))
    conn.close()
    return 0


def role_poller(args: argparse.Namespace) -> int:
    """Internal role: the baseline. Every 20 ms, PRAGMA data_version; when it moved, claim what is queued."""
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    version = None
    print("ready", flush=True)
    while True:
        now = conn.execute("PRAGMA data_version").fetchone()[0]
        if now != version:
            version = now
            picked = h.now_ms()
            conn.execute("UPDATE jobs SET status = 'completed', started_at = ?1, completed_at = ?1, duration = 0,"
                         " exit_code = 0 WHERE status = 'queued'", (picked,))
        time.sleep(POLL_INTERVAL_S)


# -- measurements -----------------------------------------------------------------------------------------

def insert_rows(ws: h.Workspace, db: Path, args: argparse.Namespace, watched: h.Proc | h.Daemon) -> list[int]:
    """Run the inserter against `db`; wait until every row is picked up; the latencies in ms."""
    argv = [h.PYTHON, SCRIPT, "--role", "inserter", "--db", str(db), "--rows", str(args.rows),
            "--gap-ms", *map(str, args.gap_ms), "--seed", str(args.seed), "--synchronous", args.synchronous]
    with h.Proc(argv, cwd=ws.path) as proc:
        expected = args.rows * (sum(args.gap_ms) / 2000) + 30
        h.wait_until(lambda: proc.popen.poll() is not None, expected, 0.05, "the inserter")
        if proc.popen.returncode != 0:
            raise h.BenchError(f"the inserter failed with exit status {proc.popen.returncode}")
    with h.Db(db) as conn:
        if isinstance(watched, h.Daemon):
            conn.wait_completed(args.rows, timeout=30, daemon=watched)
        else:
            conn.wait_completed(args.rows, timeout=30)
        rows = conn.conn.execute("SELECT started_at - created_at FROM jobs").fetchall()
    return [int(row[0]) for row in rows]


def run_daemon(ws: h.Workspace, args: argparse.Namespace) -> Result:
    db = ws.database("jobd")
    with h.Daemon(ws, db) as daemon:
        time.sleep(1.0)
        latencies = insert_rows(ws, db, args, daemon)
        time.sleep(1.0)  # let the last job's bookkeeping settle
        idle = h.cpu_share(daemon.pids, args.idle_seconds)  # the daemon and its job keeper
        daemon.check_alive()
    return Result("nexus-jobd (+ keeper)", latencies, idle)


def run_poller(ws: h.Workspace, args: argparse.Namespace) -> Result:
    db = ws.database("poller")
    argv = [h.PYTHON, SCRIPT, "--role", "poller", "--db", str(db)]
    with h.Proc(argv, stdout=subprocess.PIPE, cwd=ws.path) as proc:
        assert proc.popen.stdout is not None
        if proc.popen.stdout.readline() != b"ready\n":
            raise h.BenchError("the data_version poller did not start")
        time.sleep(1.0)
        latencies = insert_rows(ws, db, args, proc)
        time.sleep(1.0)
        idle = h.cpu_share(proc.pid, args.idle_seconds)
    return Result(f"data_version poll, {POLL_INTERVAL_S * 1000:.0f} ms", latencies, idle)


# -- report -----------------------------------------------------------------------------------------------

def report(daemon: Result, poller: Result, idle_seconds: float) -> bool:
    print()
    h.print_table(("latency (ms)", "p50", "p95", "p99", "max", "idle CPU, % of a core"), [
        (r.name, *(f"{r.pct(p):.0f}" for p in (50, 95, 99, 100)), f"{r.idle_pct[1]:.3f} ({r.idle_pct[0]:.1f})")
        for r in (daemon, poller)])
    print(f"  idle CPU over {idle_seconds:.0f} s with no jobs, from schedstat (from utime+stime in 10 ms ticks)")
    for r in (daemon, poller):
        slow = sum(1 for v in r.latencies_ms if v > P99_TARGET_MS)
        print(f"  {r.name}: {slow} of {len(r.latencies_ms)} rows waited more than {P99_TARGET_MS} ms")
    ok_p50 = daemon.pct(50) <= P50_TARGET_MS
    ok_p99 = daemon.pct(99) <= P99_TARGET_MS
    ok_idle = daemon.idle_pct[1] <= IDLE_TARGET_PCT

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b > 0 else "-"

    print()
    h.print_table(("nexus-jobd", "measured", "vs poll", "target", ""), [
        ("p50 latency", f"{daemon.pct(50):.0f} ms", ratio(daemon.pct(50), poller.pct(50)),
         f"<= {P50_TARGET_MS} ms", h.verdict(ok_p50)),
        ("p99 latency", f"{daemon.pct(99):.0f} ms", ratio(daemon.pct(99), poller.pct(99)),
         f"<= {P99_TARGET_MS} ms", h.verdict(ok_p99)),
        ("idle CPU", f"{daemon.idle_pct[1]:.3f}%", ratio(daemon.idle_pct[1], poller.idle_pct[1]),
         f"<= {IDLE_TARGET_PCT}%", h.verdict(ok_idle)),
    ])
    return ok_p50 and ok_p99 and ok_idle


def main(args: argparse.Namespace) -> int:
    if args.role == "inserter":
        return role_inserter(args)
    if args.role == "poller":
        return role_poller(args)
    if args.db:
        import _postgres

        return _postgres.latency_main(args, run_daemon)
    with h.Workspace(args) as ws:
        print(f"latency: {args.rows} rows `true`, inserted one at a time {args.gap_ms[0]}-{args.gap_ms[1]} ms apart "
              f"by another process (PRAGMA synchronous={args.synchronous}); idle CPU over {args.idle_seconds:.0f} s")
        print(f"  {h.machine(ws.path)}")
        daemon = run_daemon(ws, args)
        print(f"  nexus-jobd done: p50 {daemon.pct(50):.0f} ms", flush=True)
        poller = run_poller(ws, args)
        print(f"  poller done: p50 {poller.pct(50):.0f} ms", flush=True)
        return 0 if report(daemon, poller, args.idle_seconds) else 1


if __name__ == "__main__":
    h.run(main, parse_args())
