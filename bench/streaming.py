"""Output streaming: one job writing 100 MB of text to stdout, with output_cap_bytes above that.

Measures MB/s from started_at to completed_at, the wall time from the insert, and how far the row's
`stdout_bytes` lags behind what the process had written (sampled every 50 ms). Baselines in the same run:
the same command into /dev/null and into a pipe read by `cat > file`.
"""

from __future__ import annotations

import argparse
import bisect
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h

TARGET_MBS = 30.0
MB = 1_000_000
CHUNK = 1 << 20  # the lag writer's chunk: its progress is known to this resolution
SAMPLE_S = 0.05
FINAL = ("completed", "failed", "cancelled")


@dataclass
class Run:
    seconds: float  # started_at -> completed_at (the daemon), or the whole command (the baselines)
    wall: float = 0.0  # insert -> completed row seen
    visible: float = 0.0  # started_at -> completed row seen (completed_at is stamped before the commit lands)
    pickup_ms: int = 0  # started_at - created_at
    peak_rss_kib: int = 0
    keeper_peak_rss_kib: int = 0
    wchar: int = 0  # bytes the daemon wrote with write syscalls during the job (WAL, database, log)
    wal_bytes: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (time ns, stdout_bytes of the row)
    query_ms: list[float] = field(default_factory=list)


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=h.positive_int, default=100,
                   help="output of the job, in MB of 10^6 bytes (default 100)")
    h.add_common_args(p)
    p.add_argument("--role", choices=("writer",), help=argparse.SUPPRESS)  # internal: the instrumented job
    p.add_argument("--progress", help=argparse.SUPPRESS)
    return p


def command(size: int) -> str:
    return f"head -c {size} /dev/zero | tr '\\0' 'x'"


# -- the instrumented job ---------------------------------------------------------------------------------

def role_writer(size: int, progress_path: str) -> int:
    """Internal role: write `size` bytes of 'x' to stdout in 1 MiB chunks; after each write (which returns
    once the pipe took the bytes) append `time_ns total` to the progress file."""
    chunk = b"x" * CHUNK
    out = sys.stdout.fileno()
    written = 0
    with open(progress_path, "w", buffering=1) as progress:
        progress.write(f"{time.time_ns()} 0\n")
        while written < size:
            n = min(CHUNK, size - written)
            view = memoryview(chunk)[:n]
            while view:
                view = view[os.write(out, view):]
            written += n
            progress.write(f"{time.time_ns()} {written}\n")
    return 0


# -- nexus-jobd -------------------------------------------------------------------------------------------

def run_daemon(ws: h.Workspace, name: str, cmd: str, size: int, sample: bool) -> Run:
    db = ws.database(name)
    config = ws.config(f"{name}.toml", output_cap_bytes=size + 32 * MB)
    with h.Daemon(ws, db, config, name) as daemon, h.Db(db) as conn:
        time.sleep(0.5)
        io_before = h.io_counters(daemon.pid)
        started = time.perf_counter()
        (job_id,) = conn.insert([cmd])
        run = Run(0.0)
        while True:  # `status` comes before `stdout` in the row: reading it is cheap, whatever the output
            status = conn.conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            if status in FINAL:
                seen_ms = h.now_ms()
                break
            if time.perf_counter() - started > 110:
                raise h.BenchError(f"the job has not finished after 110 s (status {status})")
            daemon.check_alive()
            if sample and status == "executing":
                take_sample(conn, job_id, run)
            time.sleep(SAMPLE_S if sample else 0.01)
        run.wall = time.perf_counter() - started
        run.peak_rss_kib = h.memory_kib(daemon.pid)["VmHWM"]
        run.keeper_peak_rss_kib = h.memory_kib(daemon.keeper_pid)["VmHWM"]
        run.wchar = h.io_counters(daemon.pid)["wchar"] - io_before["wchar"]
        wal = db.with_name(db.name + "-wal")
        run.wal_bytes = wal.stat().st_size if wal.exists() else 0
        row = conn.conn.execute("SELECT status, created_at, started_at, completed_at, stdout_bytes, length(stdout),"
                                " substr(stdout, 1, 1), substr(stdout, -1, 1) FROM jobs WHERE id = ?",
                                (job_id,)).fetchone()
    status, created_at, started_at, completed_at, out_bytes, length, first, last = row
    if status != "completed" or out_bytes != size or length != size or (first, last) != ("x", "x"):
        raise h.BenchError(f"the row does not hold the output: status {status}, stdout_bytes {out_bytes}, "
                           f"{length} characters, {first!r}...{last!r}")
    run.seconds = (completed_at - started_at) / 1000
    run.visible = (seen_ms - started_at) / 1000
    run.pickup_ms = started_at - created_at
    run.samples.append((seen_ms * 1_000_000, size))
    return run


def take_sample(conn: h.Db, job_id: str, run: Run) -> None:
    """The row's stdout_bytes now. It is stored after `stdout`, so SQLite walks the output's overflow pages."""
    at = time.time_ns()
    before = time.perf_counter()
    value = conn.conn.execute("SELECT stdout_bytes FROM jobs WHERE id = ? AND status = 'executing'",
                              (job_id,)).fetchone()
    run.query_ms.append((time.perf_counter() - before) * 1000)
    if value is not None:
        run.samples.append((at, value[0] or 0))


# -- baselines --------------------------------------------------------------------------------------------

def run_pipe(ws: h.Workspace, cmd: str) -> Run:
    started = time.perf_counter()
    subprocess.run(["bash", "-c", cmd], check=True, cwd=ws.path)
    return Run(time.perf_counter() - started)


# -- lag --------------------------------------------------------------------------------------------------

@dataclass
class Lag:
    max_ms: float
    median_ms: float
    max_mb: float
    samples: int
    finish_ms: float  # last byte written -> row completed


def lag(run: Run, progress_path: Path) -> Lag:
    """For each sample: bytes the writer had written by then minus the row's, and the age of the oldest byte
    the row lacked (to the writer's 1 MiB resolution)."""
    progress = [tuple(map(int, line.split())) for line in progress_path.read_text().splitlines()]
    times, totals = [p[0] for p in progress], [p[1] for p in progress]
    ages, behind = [], []
    for at, row_bytes in run.samples[:-1]:  # the last sample is the completed row
        if at < times[0]:
            continue  # the process had not started writing
        i = bisect.bisect_right(times, at) - 1
        written = totals[i] if i >= 0 else 0
        behind.append(max(0, written - row_bytes))
        first_missing = bisect.bisect_right(totals, row_bytes)  # first progress line past the row
        ages.append(max(0.0, (at - times[first_missing]) / 1e6) if written > row_bytes else 0.0)
    finish = (run.samples[-1][0] - times[-1]) / 1e6
    if not ages:
        return Lag(0.0, 0.0, 0.0, 0, finish)
    return Lag(max(ages), statistics.median(ages), max(behind) / MB, len(ages), finish)


# -- report -----------------------------------------------------------------------------------------------

def report(size: int, daemon: Run, null: Run, cat: Run, lagged: Run, lag_: Lag) -> bool:
    mb = size / MB

    def rate(run: Run) -> float:
        return mb / run.seconds

    print()
    h.print_table(("", "seconds", "MB/s", "nexus-jobd / this"), [
        ("nexus-jobd, started_at -> completed_at", f"{daemon.seconds:.2f}", f"{rate(daemon):.1f}", ""),
        ("  started_at -> completed row seen", f"{daemon.visible:.2f}", f"{mb / daemon.visible:.1f}", ""),
        ("  wall: insert -> completed row seen", f"{daemon.wall:.2f}", f"{mb / daemon.wall:.1f}", ""),
        ("pipe into /dev/null", f"{null.seconds:.2f}", f"{rate(null):.0f}", f"{rate(daemon) / rate(null):.3f}x"),
        ("pipe into `cat > file`", f"{cat.seconds:.2f}", f"{rate(cat):.0f}", f"{rate(daemon) / rate(cat):.3f}x"),
    ])
    ok = rate(daemon) >= TARGET_MBS
    print(f"\n  nexus-jobd {rate(daemon):.1f} MB/s (started_at -> completed_at), target >= {TARGET_MBS:.0f} MB/s: "
          f"{h.verdict(ok)}")
    print(f"  the job started {daemon.pickup_ms} ms after its insert; completed_at is stamped when the final write "
          f"starts, the row is seen completed {(daemon.visible - daemon.seconds) * 1000:.0f} ms later")
    print(f"  daemon peak RSS (VmHWM) {daemon.peak_rss_kib / 1024:.0f} MiB, its job keeper's "
          f"{daemon.keeper_peak_rss_kib / 1024:.0f} MiB; the daemon wrote {daemon.wchar / MB:.0f} MB "
          f"({daemon.wchar / size:.1f} bytes per output byte); WAL file at the end {daemon.wal_bytes / MB:.0f} MB")
    print(f"\n  lag of the row behind the process (instrumented writer, {mb:.0f} MB in 1 MiB chunks, "
          f"stdout_bytes sampled every {SAMPLE_S * 1000:.0f} ms; this run took {lagged.seconds:.2f} s, "
          f"{rate(lagged):.1f} MB/s):")
    if lagged.query_ms:
        print(f"    {lag_.samples} samples; oldest byte missing from the row: median {lag_.median_ms:.0f} ms, "
              f"max {lag_.max_ms:.0f} ms; at most {lag_.max_mb:.1f} MB behind")
        print(f"    reading stdout_bytes took median {statistics.median(lagged.query_ms):.1f} ms, "
              f"max {max(lagged.query_ms):.1f} ms (the column is stored after stdout)")
    print(f"    last byte written -> completed row seen: {lag_.finish_ms:.0f} ms")
    return ok


def main(args: argparse.Namespace) -> int:
    size = args.megabytes * MB
    if args.role == "writer":
        return role_writer(size, args.progress)
    with h.Workspace(args) as ws:
        print(f"streaming: one job writing {args.megabytes} MB to stdout (`{command(size)}`), "
              f"output_cap_bytes {size + 32 * MB}")
        print(f"  {h.machine(ws.path)}")
        daemon = run_daemon(ws, "jobd", command(size), size, sample=False)
        print(f"  nexus-jobd done: {args.megabytes / daemon.seconds:.1f} MB/s", flush=True)
        null = run_pipe(ws, f"{command(size)} > /dev/null")
        cat = run_pipe(ws, f"{command(size)} | cat > {shlex.quote(str(ws.path / 'out.txt'))}")
        (ws.path / "out.txt").unlink()
        print(f"  pipes done: {args.megabytes / null.seconds:.0f} and {args.megabytes / cat.seconds:.0f} MB/s",
              flush=True)
        progress = ws.path / "progress.txt"
        writer = (f"exec {shlex.quote(h.PYTHON)} {shlex.quote(str(Path(__file__).resolve()))} --role writer "
                  f"--megabytes {args.megabytes} --progress {shlex.quote(str(progress))}")
        lagged = run_daemon(ws, "lag", writer, size, sample=True)
        print("  lag run done", flush=True)
        return 0 if report(size, daemon, null, cat, lagged, lag(lagged, progress)) else 1


if __name__ == "__main__":
    h.run(main, parse_args())
