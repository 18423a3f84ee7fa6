"""The PostgreSQL side of throughput.py and latency.py (`--db postgresql://...`): nexus-jobd on that database, and
procrastinate (Python, asyncio, PostgreSQL: the closest peer) on the same server, a worker with concurrency 8 whose
task runs the same `bash -c true`. Each gets a fresh database of its own on the server the URL names.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import _harness as h

SCRIPT = str(Path(__file__).resolve())
NOW_MS = "(extract(epoch from clock_timestamp()) * 1000)::bigint"


def fresh_database(url: str, prefix: str) -> str:
    """CREATE DATABASE on the server of `url` (a throwaway one per measurement); its URL."""
    from urllib.parse import urlsplit

    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    parts = urlsplit(url)  # rebuilt by hand: urlunsplit drops the `//` of an empty host (a unix socket)
    return f"{parts.scheme}://{parts.netloc}/{name}" + (f"?{parts.query}" if parts.query else "")


def drop_database(url: str, target: str) -> None:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = conninfo_to_dict(target)["dbname"]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def migrate(ws: h.Workspace, url: str) -> None:
    done = subprocess.run([h.NEXUS_JOBD, "--db", url, "db", "migrate"], env=ws.env, cwd=ws.path,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise h.BenchError(f"`nexus-jobd db migrate` failed: {done.stderr.strip()}")


# -- nexus-jobd on PostgreSQL -----------------------------------------------------------------------------

def jobd_throughput(ws: h.Workspace, server_url: str, jobs: int, concurrency: int, name: str) -> tuple[float, str]:
    """Seconds from one INSERT of `jobs` rows to all completed, and a note."""
    import psycopg

    url = fresh_database(server_url, "jobd")
    try:
        migrate(ws, url)
        config = ws.config(f"{name}.toml", max_concurrent=concurrency)
        with h.Daemon(ws, url, config, name) as daemon, psycopg.connect(url, autocommit=True) as conn:  # type: ignore[arg-type]
            time.sleep(0.5)
            started = time.perf_counter()
            conn.execute(f"INSERT INTO jobs (id, node_id, tool, command, status, created_at) SELECT 'j' || i, "
                         f"'localhost', 'bash', 'true', 'queued', {NOW_MS} FROM generate_series(1, %s) AS i",
                         (jobs,))

            _wait_all(conn, "SELECT count(*) FILTER (WHERE status = 'completed' AND duration IS NOT NULL), "
                            "count(*) FILTER (WHERE status IN ('failed', 'cancelled')) FROM jobs",
                      jobs, "nexus-jobd", 30 + jobs / 50, daemon.check_alive)
            elapsed = time.perf_counter() - started
    finally:
        drop_database(server_url, url)
    return elapsed, ""


def _wait_all(conn: Any, query: str, jobs: int, who: str, timeout: float, check: Any) -> None:
    """Until `query` (done, failed) counts `jobs` done; BenchError at the first failed one or at the deadline."""

    def done() -> bool:
        check()
        row = conn.execute(query).fetchone()
        assert row is not None
        if row[1]:
            raise h.BenchError(f"{row[1]} {who} job(s) did not complete")
        return bool(row[0] == jobs)

    h.wait_until(done, timeout, 0.02, f"{jobs} {who} jobs")


def jobd_latency(ws: h.Workspace, server_url: str, rows: int, gap_ms: tuple[int, int]) -> list[float]:
    """Rows inserted one at a time by another connection; started_at - created_at, both the database's clock."""
    import random

    import psycopg

    url = fresh_database(server_url, "jobdlat")
    rng = random.Random(1)
    try:
        migrate(ws, url)
        with h.Daemon(ws, url, None, "jobd-pg-latency") as daemon, psycopg.connect(url, autocommit=True) as conn:  # type: ignore[arg-type]
            time.sleep(1.0)
            for i in range(rows):
                time.sleep(rng.uniform(*gap_ms) / 1000)
                conn.execute(f"INSERT INTO jobs (id, node_id, tool, command, status, created_at) "
                             f"VALUES (%s, 'localhost', 'bash', 'true', 'queued', {NOW_MS})", (f"l{i}",))

            def done() -> bool:
                daemon.check_alive()
                row = conn.execute("SELECT count(*) FROM jobs WHERE duration IS NOT NULL").fetchone()
                return row is not None and row[0] == rows

            h.wait_until(done, 30, 0.02, "latency rows done")
            latencies = [float(r[0]) for r in conn.execute("SELECT started_at - created_at FROM jobs").fetchall()]
    finally:
        drop_database(server_url, url)
    return latencies


# -- procrastinate ----------------------------------------------------------------------------------------

def make_app(url: str) -> tuple[Any, Any]:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))

    @app.task(name="run_true")  # type: ignore[untyped-decorator]
    async def run_true() -> int:
        proc = await asyncio.create_subprocess_exec("bash", "-c", "true")
        return await proc.wait()

    return app, run_true


def procrastinate_worker(url: str, concurrency: int) -> int:
    """Internal role: procrastinate's worker, `concurrency` jobs at a time, LISTEN/NOTIFY on, until killed."""
    app, _ = make_app(url)

    async def work() -> None:
        async with app.open_async():
            print("ready", flush=True)
            await app.run_worker_async(concurrency=concurrency, wait=True, install_signal_handlers=True)

    asyncio.run(work())
    return 0


def _procrastinate_db(server_url: str) -> str:
    url = fresh_database(server_url, "procr")
    app, _ = make_app(url)

    async def schema() -> None:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()

    asyncio.run(schema())
    return url


def _worker(ws: h.Workspace, url: str, concurrency: int, name: str) -> h.Proc:
    argv = [h.PYTHON, SCRIPT, "--procrastinate-worker", url, str(concurrency)]
    log = (ws.path / f"{name}.log").open("wb")
    proc = h.Proc(argv, stdout=subprocess.PIPE, stderr=log, cwd=ws.path)
    assert proc.popen.stdout is not None
    if proc.popen.stdout.readline() != b"ready\n":
        proc.stop()
        raise h.BenchError(f"procrastinate's worker did not start; see {ws.path / name}.log")
    time.sleep(0.5)
    return proc


def procrastinate_throughput(ws: h.Workspace, server_url: str, jobs: int, concurrency: int, name: str) -> float:
    import procrastinate
    import psycopg

    url = _procrastinate_db(server_url)
    try:
        with _worker(ws, url, concurrency, name), psycopg.connect(url, autocommit=True) as conn:
            app_sync = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=url))
            started = time.perf_counter()
            with app_sync.open():  # one statement for all jobs, as the daemon's rows get one INSERT
                app_sync.configure_task("run_true").batch_defer(*([{}] * jobs))

            _wait_all(conn, "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                            "count(*) FILTER (WHERE status = 'failed') FROM procrastinate_jobs",
                      jobs, "procrastinate", 30 + jobs / 20, lambda: None)
            elapsed = time.perf_counter() - started
    finally:
        drop_database(server_url, url)
    return elapsed


def procrastinate_latency(ws: h.Workspace, server_url: str, rows: int, gap_ms: tuple[int, int]) -> list[float]:
    """Jobs deferred one at a time; from the `deferred` to the `started` event, both the database's clock."""
    import random

    import procrastinate
    import psycopg

    url = _procrastinate_db(server_url)
    rng = random.Random(1)
    try:
        with _worker(ws, url, 8, "procrastinate-latency"), psycopg.connect(url, autocommit=True) as conn:
            app_sync = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=url))
            with app_sync.open():
                for _ in range(rows):
                    time.sleep(rng.uniform(*gap_ms) / 1000)
                    app_sync.configure_task("run_true").defer()

            def done() -> bool:
                row = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'").fetchone()
                return row is not None and row[0] == rows

            h.wait_until(done, 60, 0.02, "procrastinate latency jobs")
            latencies = [float(r[0]) for r in conn.execute(
                "SELECT extract(epoch FROM s.at - d.at) * 1000 FROM procrastinate_events AS d "
                "JOIN procrastinate_events AS s ON s.job_id = d.job_id AND s.type = 'started' "
                "WHERE d.type = 'deferred'").fetchall()]
    finally:
        drop_database(server_url, url)
    return latencies


# -- the side-by-side reports ------------------------------------------------------------------------------

THROUGHPUT_TARGET = 1.5  # nexus-jobd on PostgreSQL: at least 1.5x procrastinate's jobs/s
P50_TARGET_MS = 5.0


def throughput_main(args: Any, run_sqlite: Any) -> int:
    """`throughput.py --db postgresql://...`: nexus-jobd on PostgreSQL, on SQLite, and procrastinate, each round."""
    jobs, concurrency = args.jobs, args.max_concurrent
    seconds: dict[str, list[float]] = {"pg": [], "sqlite": [], "procrastinate": []}
    with h.Workspace(args) as ws:
        print(f"throughput: {jobs} x `bash -c true`, at most {concurrency} at a time, {args.rounds} round(s); "
              f"PostgreSQL server of {h_redact(args.db)}")
        print(f"  {h.machine(ws.path)}")
        for n in range(1, args.rounds + 1):
            seconds["pg"].append(jobd_throughput(ws, args.db, jobs, concurrency, f"jobd-pg-{n}")[0])
            seconds["sqlite"].append(run_sqlite(ws, jobs, concurrency, f"jobd-sqlite-{n}").seconds)
            seconds["procrastinate"].append(procrastinate_throughput(ws, args.db, jobs, concurrency,
                                                                     f"procrastinate-{n}"))
            print(f"  round {n}: " + ", ".join(f"{k} {jobs / v[-1]:.0f} jobs/s" for k, v in seconds.items()),
                  flush=True)
    rate = {k: jobs / statistics.median(v) for k, v in seconds.items()}
    print(f"\n  median of {args.rounds} round(s):")
    h.print_table(("", "seconds", "jobs/s"), [
        ("nexus-jobd, PostgreSQL", f"{statistics.median(seconds['pg']):.2f}", f"{rate['pg']:.0f}"),
        ("nexus-jobd, SQLite", f"{statistics.median(seconds['sqlite']):.2f}", f"{rate['sqlite']:.0f}"),
        (f"procrastinate, concurrency {concurrency}", f"{statistics.median(seconds['procrastinate']):.2f}",
         f"{rate['procrastinate']:.0f}")])
    ratio = rate["pg"] / rate["procrastinate"]
    ok = ratio >= THROUGHPUT_TARGET
    print()
    h.print_table(("", "ratio", "target", ""), [
        ("nexus-jobd (PostgreSQL) / procrastinate", f"{ratio:.2f}x", f">= {THROUGHPUT_TARGET}x", h.verdict(ok))])
    return 0 if ok else 1


def latency_main(args: Any, run_sqlite: Any) -> int:
    """`latency.py --db postgresql://...`: pick-up latency of nexus-jobd on PostgreSQL, on SQLite, procrastinate."""
    gap = (int(args.gap_ms[0]), int(args.gap_ms[1]))
    with h.Workspace(args) as ws:
        print(f"latency: {args.rows} rows `true`, inserted one at a time {gap[0]}-{gap[1]} ms apart by another "
              f"connection; PostgreSQL server of {h_redact(args.db)}")
        print(f"  {h.machine(ws.path)}")
        results = {"nexus-jobd, PostgreSQL (LISTEN/NOTIFY)": jobd_latency(ws, args.db, args.rows, gap)}
        sqlite = run_sqlite(ws, args)
        results["nexus-jobd, SQLite (inotify)"] = [float(v) for v in sqlite.latencies_ms]
        results["procrastinate (LISTEN/NOTIFY)"] = procrastinate_latency(ws, args.db, args.rows, gap)
    print()
    h.print_table(("pick-up latency (ms)", "p50", "p90", "p99", "max"), [
        (name, *(f"{h.percentile(v, q):.1f}" for q in (50, 90, 99, 100))) for name, v in results.items()])
    print("  PostgreSQL: started_at - created_at, both from the database's clock, in whole ms (procrastinate: its "
          "deferred and started events, in µs); SQLite: as latency.py measures it")
    p50 = h.percentile(next(iter(results.values())), 50)
    ok = p50 <= P50_TARGET_MS
    print()
    h.print_table(("", "measured", "target", ""), [
        ("nexus-jobd (PostgreSQL) p50", f"{p50:.1f} ms", f"<= {P50_TARGET_MS:.0f} ms", h.verdict(ok))])
    return 0 if ok else 1


def h_redact(url: str) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from daemon.config import redact_url

    return redact_url(url)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--procrastinate-worker":
    sys.exit(procrastinate_worker(sys.argv[2], int(sys.argv[3])))
