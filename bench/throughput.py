"""Throughput: N `bash -c true` rows inserted in one transaction into an idle daemon, until all are completed.

Baselines in the same run, at the same parallelism: `xargs -P` running `bash -c true` N times, and huey's
SqliteHuey with a consumer of that many threads running the command through subprocess.run.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as h

XARGS_TARGET = 0.8  # the daemon's jobs/s at least 0.8x xargs'
HUEY_TARGET = 1.2  # and at least 1.2x huey's


@dataclass
class Result:
    name: str
    seconds: float
    jobs: int
    cpu: h.Cpu | None = None  # of the dispatching process
    notes: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=h.positive_int, default=2000, help="rows to run (default 2000)")
    p.add_argument("--max-concurrent", type=h.positive_int, default=8,
                   help="the daemon's max_concurrent, xargs -P and huey's worker threads (default 8)")
    p.add_argument("--rounds", type=h.positive_int, default=3,
                   help="rounds of all three; medians are compared (default 3)")
    h.add_common_args(p)
    p.add_argument("--db", metavar="URL", help="a postgresql:// URL: compare nexus-jobd on PostgreSQL, on SQLite "
                   "and procrastinate instead (throwaway databases are made on that server)")
    p.add_argument("--huey-consumer", metavar="DB", help=argparse.SUPPRESS)  # internal: run huey's consumer
    return p


# -- nexus-jobd -------------------------------------------------------------------------------------------

def run_daemon(ws: h.Workspace, jobs: int, concurrency: int, name: str) -> Result:
    db = ws.database(name)
    config = ws.config(f"{name}.toml", max_concurrent=concurrency)
    with h.Daemon(ws, db, config, name) as daemon, h.Db(db) as conn:
        time.sleep(0.5)  # idle: start-up work is over
        pids = daemon.pids
        before, loop_before = h.cpu_sum(pids), h.main_thread_cpu(daemon.pid)
        keeper_before = h.cpu(daemon.keeper_pid)
        insert_ms = h.now_ms()
        started = time.perf_counter()
        conn.insert(["true"] * jobs)
        conn.wait_completed(jobs, timeout=30 + jobs / 50, daemon=daemon)
        elapsed = time.perf_counter() - started
        used, loop = h.cpu_sum(pids) - before, h.main_thread_cpu(daemon.pid) - loop_before
        keeper = h.cpu(daemon.keeper_pid) - keeper_before
        first, last, busy = conn.conn.execute(
            "SELECT min(started_at), max(completed_at), sum(completed_at - started_at) FROM jobs").fetchone()
    span = max(1, last - first)
    notes = [f"first job started {first - insert_ms} ms after the insert; {jobs / span * 1000:.0f} jobs/s from there",
             f"on average {busy / span:.1f} jobs between started_at and completed_at; CPU/job: daemon's main thread "
             f"{loop / jobs * 1000:.2f} ms, its other threads {(used.own - keeper.own - loop) / jobs * 1000:.2f} ms, "
             f"keeper {keeper.own / jobs * 1000:.2f} ms"]
    return Result("nexus-jobd", elapsed, jobs, used, notes)


# -- xargs ------------------------------------------------------------------------------------------------

def run_xargs(jobs: int, concurrency: int) -> Result:
    argv = ["xargs", "-t", "-P", str(concurrency), "-n", "1", "bash", "-c"]  # -t: one stderr line per command
    started = time.perf_counter()
    done = subprocess.run(argv, input=b"true\n" * jobs, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    ran = done.stderr.count(b"bash -c true\n")
    if done.returncode != 0 or ran != jobs:
        raise h.BenchError(f"xargs exited {done.returncode} after running `bash -c true` {ran} times, not {jobs}")
    return Result(f"xargs -P {concurrency}", elapsed, jobs)


# -- huey -------------------------------------------------------------------------------------------------

def make_huey(db: str) -> tuple[Any, Any]:
    """The same app in the consumer and in the benchmark: a SqliteHuey and one task that runs the command."""
    from huey import SqliteHuey

    huey = SqliteHuey("bench", filename=db)

    @huey.task()  # type: ignore[untyped-decorator]
    def run_true() -> int:
        return subprocess.run(["bash", "-c", "true"], check=False).returncode

    return huey, run_true


def huey_consumer(db: str, workers: int) -> int:
    """Internal role: huey's consumer with `workers` threads and its default polling, until SIGTERM."""
    huey, _ = make_huey(db)
    consumer = huey.create_consumer(workers=workers, worker_type="thread")
    print("ready", flush=True)
    consumer.run()
    return 0


def run_huey(ws: h.Workspace, jobs: int, concurrency: int, name: str) -> Result:
    db = str(ws.path / f"{name}.db")
    huey, run_true = make_huey(db)
    argv = [h.PYTHON, str(Path(__file__).resolve()), "--huey-consumer", db, "--max-concurrent", str(concurrency)]
    log_path = ws.path / f"{name}.log"
    with log_path.open("wb") as log, h.Proc(argv, stdout=subprocess.PIPE, stderr=log, cwd=ws.path) as consumer:
        assert consumer.popen.stdout is not None
        if consumer.popen.stdout.readline() != b"ready\n":
            raise h.BenchError(f"huey's consumer did not start; see {log_path}")
        time.sleep(0.2)  # its threads are polling
        before = h.cpu(consumer.pid)
        # One transaction for all tasks, as the daemon's rows get: huey's own serializer and table.
        messages = [(huey.storage.name, huey.serialize_task(run_true.s()), 0) for _ in range(jobs)]
        started = time.perf_counter()
        with huey.storage.db(commit=True) as cursor:
            cursor.executemany("INSERT INTO task (queue, data, priority) VALUES (?, ?, ?)", messages)
        inserted = time.perf_counter()

        def finished() -> bool:
            if not consumer.alive():
                raise h.BenchError(f"huey's consumer died; see {log_path}")
            return bool(huey.result_count() >= jobs)

        h.wait_until(finished, 30 + jobs / 50, 0.02, f"{jobs} huey results")
        elapsed = time.perf_counter() - started
        used = h.cpu(consumer.pid) - before
    codes = [huey.serializer.deserialize(value) for value in huey.storage.result_items().values()]
    if codes.count(0) != jobs:
        raise h.BenchError(f"huey ran `bash -c true` successfully {codes.count(0)} times, not {jobs}")
    return Result(f"huey, {concurrency} threads", elapsed, jobs, used,
                  [f"enqueue (one transaction) took {(inserted - started) * 1000:.0f} ms"])


# -- report -----------------------------------------------------------------------------------------------

def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.rate)[len(results) // 2]


def per_job_ms(seconds: float | None, jobs: int) -> str:
    return "-" if seconds is None else f"{seconds / jobs * 1000:.2f}"


def report(daemon: Result, xargs: Result, huey: Result, rounds: int) -> bool:
    print(f"\n  median of {rounds} round(s):" if rounds > 1 else "")
    h.print_table(
        ("", "seconds", "jobs/s", "CPU ms/job", "jobs' CPU ms/job"),
        [(r.name, f"{r.seconds:.2f}", f"{r.rate:.0f}", per_job_ms(r.cpu.own if r.cpu else None, r.jobs),
          per_job_ms(r.cpu.children if r.cpu else None, r.jobs)) for r in (daemon, xargs, huey)])
    vs_xargs, vs_huey = daemon.rate / xargs.rate, daemon.rate / huey.rate
    ok_xargs, ok_huey = vs_xargs >= XARGS_TARGET, vs_huey >= HUEY_TARGET
    print()
    h.print_table(("", "ratio", "target", ""), [
        ("nexus-jobd / xargs", f"{vs_xargs:.2f}x", f">= {XARGS_TARGET}x", h.verdict(ok_xargs)),
        ("nexus-jobd / huey", f"{vs_huey:.2f}x", f">= {HUEY_TARGET}x", h.verdict(ok_huey)),
    ])
    assert daemon.cpu is not None
    own, precise = per_job_ms(daemon.cpu.own, daemon.jobs), per_job_ms(daemon.cpu.own_precise, daemon.jobs)
    print(f"\n  nexus-jobd's own CPU (daemon + keeper, user+sys, /proc/PID/stat): {daemon.cpu.own:.2f} s for "
          f"{daemon.jobs} jobs"
          f" = {own} ms/job ({precise} ms/job by schedstat)")
    print("  CPU ms/job: the dispatching processes (nexus-jobd: daemon + keeper); jobs' CPU: their children (bash),"
          " as they reaped them")
    return ok_xargs and ok_huey


def main(args: argparse.Namespace) -> int:
    if args.huey_consumer:
        return huey_consumer(args.huey_consumer, args.max_concurrent)
    if args.db:
        import _postgres

        return _postgres.throughput_main(args, run_daemon)
    jobs, concurrency = args.jobs, args.max_concurrent
    results: dict[str, list[Result]] = {"daemon": [], "xargs": [], "huey": []}
    with h.Workspace(args) as ws:
        print(f"throughput: {jobs} x `bash -c true`, at most {concurrency} at a time, {args.rounds} round(s)")
        print(f"  {h.machine(ws.path)}")
        for n in range(1, args.rounds + 1):
            round_ = [run_daemon(ws, jobs, concurrency, f"jobd-{n}"), run_xargs(jobs, concurrency),
                      run_huey(ws, jobs, concurrency, f"huey-{n}")]
            for key, result in zip(results, round_, strict=True):
                results[key].append(result)
            print(f"  round {n}: " + ", ".join(f"{r.name} {r.rate:.0f} jobs/s" for r in round_), flush=True)
            for result in round_:
                for note in result.notes:
                    print(f"    {result.name}: {note}", flush=True)
        ok = report(median(results["daemon"]), median(results["xargs"]), median(results["huey"]), args.rounds)
        return 0 if ok else 1


if __name__ == "__main__":
    h.run(main, parse_args())
