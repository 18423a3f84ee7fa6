"""The web console's costs: 100 SSE clients following one job that writes 10 MB/s (each must see every byte, in
order), the web process's CPU per 10 clients beyond the first, the daemon's pickup latency and throughput with 100
watchers against none, the latency from a row's change to its SSE event, and the web process's RSS idle and with
100 clients.

Baselines in the same run: the same job and the same probes with no web process at all (the daemon's figures), a
poller that reads the row every 100 ms as `nexus-jobd logs -f` does (event latency), and idle Python processes that
import only asyncio and sqlite3, or also Starlette and uvicorn (RSS).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import _harness as h

SCRIPT = str(Path(__file__).resolve())
LINE = 100  # bytes per line the writer writes: a 9-digit number, a space, letters, a newline
CPU_PER_10_TARGET_PCT = 5.0
LATENCY_P50_TARGET_MS = 50.0
DAEMON_TARGET = 1.10  # pickup latency and throughput with 100 watchers within 10 % of none
URL = re.compile(r"nexus-jobd web: open http://([^/]+)/\?token=(\S+)")


def parse_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=h.positive_int, default=100, help="SSE clients (default 100)")
    p.add_argument("--rate", type=h.positive_int, default=10_000_000, help="bytes/s the job writes (default 10 MB/s)")
    p.add_argument("--seconds", type=float, default=4.0, help="how long it writes (default 4)")
    p.add_argument("--events", type=h.positive_int, default=200, help="row changes timed for event latency")
    p.add_argument("--cap-mib", type=h.positive_int, default=16,
                   help="the daemon's output_cap_bytes in MiB (default 16; the daemon's own default is 4: the row "
                        "keeps a head and a tail of 3/4 of the cap, so at 10 MB/s a flush that comes late drops bytes "
                        "from the row itself, and no reader can see them)")
    h.add_common_args(p)
    p.add_argument("--role", choices=("writer", "clients", "poller"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--token", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    return p


# -- internal roles: the job, the SSE clients, the polling baseline ---------------------------------------

def line(i: int) -> bytes:
    return (f"{i:09d} " + "abcdefghijklmnopqrstuvwxyz" * 4)[:LINE - 1].encode() + b"\n"


def role_writer(rate: int, seconds: float) -> int:
    """The job: `rate` bytes/s of numbered lines for `seconds`, paced by the clock in 10 ms steps."""
    out = sys.stdout.buffer
    total = int(rate * seconds) // LINE
    start, written = time.monotonic(), 0
    while written < total:
        due = min(total, int((time.monotonic() - start) * rate) // LINE + rate // LINE // 100)
        if due > written:
            out.write(b"".join(line(i) for i in range(written, due)))
            out.flush()
            written = due
        time.sleep(0.01)
    return 0


@dataclass
class Seen:
    length: int = 0
    crc: int = 0
    gaps: int = 0
    done: bool = False
    marks: dict[str, float] = field(default_factory=dict)  # "s<n>" lines: when each arrived (event latency)


MARKS = re.compile(rb"(s\d+\n)+\Z")
TEXT = re.compile(rb'"type": "output_chunk", "stream": "stdout", "text": "(.*?)", "isIncremental"')


async def _client(host: str, token: str, job: str, seen: Seen) -> None:
    name, port = host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(name, int(port), limit=1 << 24)
    # HTTP/1.0: the body is the stream itself, no chunked framing to take apart.
    writer.write(f"GET /api/v1/jobs/{job}/stream HTTP/1.0\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise SystemExit(f"stream refused: {head[:200]!r}")
    buffer = b""
    while not seen.done:
        data = await reader.read(1 << 20)
        if not data:
            break
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            _take(event, seen)
    writer.close()


def _take(event: bytes, seen: Seen) -> None:
    if b'"type": "done"' in event:
        seen.done = True
        return
    found = TEXT.search(event)
    if found is None:
        return
    text = found.group(1).replace(b"\\n", b"\n")
    if b"not shown]" in text:
        seen.gaps += 1
    seen.length += len(text)
    seen.crc = zlib.crc32(text, seen.crc)
    if MARKS.match(text):  # the event latency run's row: lines s0, s1, ...
        now = time.time()
        for mark in text.split(b"\n"):
            if mark:
                seen.marks.setdefault(mark.decode(), now)


def role_clients(args: argparse.Namespace) -> int:
    """`--clients` SSE clients in one process; prints one JSON line per client when the stream ends."""

    async def main() -> list[Seen]:
        seen = [Seen() for _ in range(args.clients)]
        await asyncio.gather(*(_client(args.host, args.token, args.job, s) for s in seen))
        return seen

    for s in asyncio.run(main()):
        print(json.dumps({"length": s.length, "crc": s.crc, "gaps": s.gaps, "done": s.done, "marks": s.marks}))
    return 0


def role_poller(args: argparse.Namespace) -> int:
    """The baseline for event latency: read the row every 100 ms (`nexus-jobd logs -f`), note new marks."""
    conn = sqlite3.connect(f"file:{args.db}?mode=ro", uri=True, isolation_level=None)
    seen: dict[str, float] = {}
    while True:
        row = conn.execute("SELECT stdout, status FROM jobs WHERE id = ?", (args.job,)).fetchone()
        now = time.time()
        for mark in (row[0] or "").split("\n"):
            if mark and mark not in seen:
                seen[mark] = now
        if row[1] != "executing":
            print(json.dumps(seen))
            return 0
        time.sleep(0.1)


# -- the web process ---------------------------------------------------------------------------------------

class Web:
    def __init__(self, ws: h.Workspace, db: Path) -> None:
        self.ws, self.db = ws, db
        self.log_path = ws.path / f"web-{uuid.uuid4().hex[:6]}.log"
        config = ws.path / "web.toml"
        config.write_text(f'[web]\ntoken_file = "{ws.path / "web-token"}"\n')
        with self.log_path.open("wb") as log:
            # Niced as its units run it (Nice=10): the daemon's claims come first on a busy machine.
            self.proc = h.Proc(["nice", "-n", "10", h.NEXUS_JOBD, "--db", str(db), "--config", str(config),
                                "--log-format", "json",
                                "web", "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                               env=ws.env, cwd=ws.path)
        found = h.wait_until(self._started, 20, 0.02, "web start-up")
        self.host, self.token = found.group(1), found.group(2)

    def _started(self) -> re.Match[str] | None:
        self._dead()
        return URL.search(self.log_path.read_text())

    def _dead(self) -> None:
        if not self.proc.alive():
            raise h.BenchError(f"the web process exited: {self.log_path.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def clients(self, job: str, n: int) -> h.Proc:
        out = (self.ws.path / f"clients-{job}.jsonl").open("wb")
        # The clients stand for browsers on other machines: niced too, so that they take what the daemon leaves.
        return h.Proc(["nice", "-n", "10", h.PYTHON, SCRIPT, "--role", "clients", "--clients", str(n),
                       "--host", self.host, "--token", self.token, "--job", job], stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.stop()


# -- one fan-out run ---------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str
    clients: int
    web_cpu_pct: float = 0.0
    daemon_cpu_pct: float = 0.0
    pickup_ms: list[float] = field(default_factory=list)
    burst_jobs_per_s: float = 0.0
    job_mb_per_s: float = 0.0
    ok_clients: int = 0
    problems: list[str] = field(default_factory=list)
    rss_kib: int = 0
    clients_cpu_pct: float = 0.0


def _probe(db: Path, stop: threading.Event, out: list[str]) -> None:
    """Insert a `true` row every 50 ms as another program: their pickup latency is the daemon's."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    while not stop.wait(0.05):
        job_id = str(uuid.uuid4())
        conn.execute(h.INSERT_JOB, (job_id, "bash", "true", h.now_ms()))
        out.append(job_id)
    conn.close()


def fan_out(args: argparse.Namespace, ws: h.Workspace, db: Path, daemon: h.Daemon, web: Web | None,
            n: int, name: str) -> Run:
    run = Run(name, n)
    rows = h.Db(db)
    writer = f"exec {shlex.quote(h.PYTHON)} {shlex.quote(SCRIPT)} --role writer --rate {args.rate} " \
             f"--seconds {args.seconds}"
    job = str(uuid.uuid4())
    rows.conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at, run_after) VALUES "
                      "(?, 'localhost', 'bash', ?, 'queued', ?, ?)", (job, writer, h.now_ms(), h.now_ms() + 1500))
    clients = web.clients(job, n) if web is not None else None
    pids = [daemon.pid, daemon.keeper_pid]
    h.wait_until(lambda: rows.conn.execute("SELECT started_at FROM jobs WHERE id = ?", (job,)).fetchone()[0],
                 30, 0.005, "the writer to start")
    cpu_before = (h.cpu(web.pid) if web else None, h.cpu_sum(pids), time.monotonic(),
                  h.cpu(clients.pid) if clients else None)
    probes: list[str] = []
    stop = threading.Event()
    prober = threading.Thread(target=_probe, args=(db, stop, probes))
    prober.start()
    time.sleep(args.seconds / 2)
    burst = rows.insert(["true"] * 300)
    burst_at = time.monotonic()
    h.wait_until(lambda: rows.conn.execute(f"SELECT count(*) FROM jobs WHERE status = 'completed' AND id IN "
                                           f"({','.join('?' * len(burst))})", burst).fetchone()[0] == len(burst),
                 60, 0.005, "the burst of 300 jobs")
    run.burst_jobs_per_s = len(burst) / (time.monotonic() - burst_at)
    h.wait_until(lambda: rows.conn.execute("SELECT duration FROM jobs WHERE id = ?", (job,)).fetchone()[0]
                 is not None, 120, 0.01, "the writer's row to be final")
    stop.set()
    prober.join()
    elapsed = time.monotonic() - cpu_before[2]
    if web is not None and cpu_before[0] is not None:
        run.web_cpu_pct = (h.cpu(web.pid) - cpu_before[0]).own_precise / elapsed * 100
    run.daemon_cpu_pct = (h.cpu_sum(pids) - cpu_before[1]).own_precise / elapsed * 100
    if clients is not None and cpu_before[3] is not None:
        run.clients_cpu_pct = (h.cpu(clients.pid) - cpu_before[3]).own_precise / elapsed * 100
    row = rows.conn.execute("SELECT stdout_bytes, started_at, completed_at FROM jobs WHERE id = ?",
                            (job,)).fetchone()
    lines = int(args.rate * args.seconds) // LINE
    if row[0] != lines * LINE:
        run.problems.append(f"the job wrote {row[0]} bytes, expected {lines * LINE}")
    run.job_mb_per_s = row[0] / max(1, row[2] - row[1]) / 1000
    h.wait_until(lambda: all(rows.conn.execute("SELECT duration FROM jobs WHERE id = ?", (p,)).fetchone()[0]
                             is not None for p in probes[-3:]), 30, 0.01, "the last probes")
    marks = ",".join("?" * len(probes))
    run.pickup_ms = [float(r[0]) for r in rows.conn.execute(
        f"SELECT started_at - created_at FROM jobs WHERE id IN ({marks}) AND started_at IS NOT NULL", probes)]
    if clients is not None and web is not None:
        run.rss_kib = h.memory_kib(web.pid).get("VmHWM", 0)
        h.wait_until(lambda: not clients.alive(), 120, 0.05, "the SSE clients to see the job's end")
        _check_clients(run, ws.path / f"clients-{job}.jsonl", lines, n)
    rows.close()
    return run


def _check_clients(run: Run, path: Path, lines: int, n: int) -> None:
    """Each client's bytes against what the writer wrote (its lines are a function of their number)."""
    crc = 0
    for i in range(lines):
        crc = zlib.crc32(line(i), crc)
    want = (lines * LINE, crc)
    for text in path.read_text().splitlines():
        try:
            got = json.loads(text)
        except ValueError:
            run.problems.append(f"a client said: {text[:200]}")
            continue
        if (got["length"], got["crc"]) == want and got["done"] and not got["gaps"]:
            run.ok_clients += 1
    if run.ok_clients != n:
        run.problems.append(f"{n - run.ok_clients} of {n} clients did not see every byte in order")


# -- event latency -----------------------------------------------------------------------------------------

def event_latency(args: argparse.Namespace, ws: h.Workspace, db: Path, web: Web) -> tuple[list[float], list[float]]:
    """A row that this script writes as a daemon would (appending to stdout), followed by one SSE client and by
    the 100 ms poller; latency: from just after each commit to the arrival of that change."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    job = str(uuid.uuid4())
    conn.execute("INSERT INTO jobs (id, node_id, tool, command, status, created_at, started_at, stdout, "
                 "stdout_bytes) VALUES (?, 'nobody', 'bash', 'marks', 'executing', ?, ?, '', 0)",
                 (job, h.now_ms(), h.now_ms()))
    client = web.clients(job, 1)
    poller_out = (ws.path / "poller.json").open("wb")
    poller = h.Proc([h.PYTHON, SCRIPT, "--role", "poller", "--db", str(db), "--job", job], stdout=poller_out)
    time.sleep(1.0)
    import random

    rng = random.Random(1)
    committed: dict[str, float] = {}
    text = ""
    for i in range(args.events):
        time.sleep(rng.uniform(0.02, 0.1))
        text += f"s{i}\n"
        conn.execute("UPDATE jobs SET stdout = ?, stdout_bytes = ? WHERE id = ?", (text, len(text), job))
        committed[f"s{i}"] = time.time()
    time.sleep(0.5)
    conn.execute("UPDATE jobs SET status = 'completed', exit_code = 0, completed_at = ?, duration = 1 WHERE id = ?",
                 (h.now_ms(), job))
    h.wait_until(lambda: not client.alive() and not poller.alive(), 30, 0.05, "the follower and the poller to end")
    seen = json.loads((ws.path / f"clients-{job}.jsonl").read_text().splitlines()[0])["marks"]
    polled = json.loads((ws.path / "poller.json").read_text())
    conn.close()
    return ([(seen[k] - t) * 1000 for k, t in committed.items() if k in seen],
            [(polled[k] - t) * 1000 for k, t in committed.items() if k in polled])


# -- memory ------------------------------------------------------------------------------------------------

def idle_python_rss(imports: str) -> int:
    code = f"import asyncio, {imports}\nasync def main():\n    await asyncio.sleep(3)\nasyncio.run(main())"
    with h.Proc([h.PYTHON, "-c", code]) as proc:
        time.sleep(1.5)
        return h.memory_kib(proc.pid)["VmRSS"]


# -- the report --------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    print(h.machine())
    with h.Workspace(args) as ws:
        db = ws.database("jobs")
        config = ws.config(output_cap_bytes=args.cap_mib * 1024 * 1024)
        with h.Daemon(ws, db, config) as daemon:
            none = fan_out(args, ws, db, daemon, None, 0, "no web process")
            web = Web(ws, db)
            try:
                time.sleep(2)
                idle_rss = h.memory_kib(web.pid)["VmRSS"]
                idle_cpu = h.cpu_share(web.pid, 5)[1]
                one = fan_out(args, ws, db, daemon, web, 1, "web, 1 client")
                many = fan_out(args, ws, db, daemon, web, args.clients, f"web, {args.clients} clients")
                sse_ms, poll_ms = event_latency(args, ws, db, web)
            finally:
                web.stop()
    bare = idle_python_rss("sqlite3")
    libs = idle_python_rss("sqlite3, starlette.applications, uvicorn")
    return report(args, none, one, many, sse_ms, poll_ms, (idle_rss, idle_cpu, bare, libs))


def report(args: argparse.Namespace, none: Run, one: Run, many: Run, sse_ms: list[float], poll_ms: list[float],
           memory: tuple[int, float, int, int]) -> int:
    idle_rss, idle_cpu, bare, libs = memory
    per10 = (many.web_cpu_pct - one.web_cpu_pct) / ((many.clients - 1) / 10)
    pickup = [h.percentile(r.pickup_ms, 50) for r in (none, one, many)]
    print(f"\nfan-out: one job writing {args.rate / 1e6:g} MB/s for {args.seconds:g} s "
          f"({int(args.rate * args.seconds) // LINE * LINE / 1e6:g} MB), output_cap_bytes {args.cap_mib} MiB")
    h.print_table(["run", "web CPU % of a core", "clients' CPU %", "daemon+keeper CPU %", "pickup p50 ms",
                   "burst jobs/s", "clients with every byte", "web peak RSS MiB"],
                  [[r.name, f"{r.web_cpu_pct:.1f}", f"{r.clients_cpu_pct:.1f}", f"{r.daemon_cpu_pct:.1f}",
                    f"{h.percentile(r.pickup_ms, 50):.0f}",
                    f"{r.burst_jobs_per_s:.0f}", f"{r.ok_clients}/{r.clients}" if r.clients else "-",
                    f"{r.rss_kib / 1024:.1f}" if r.rss_kib else "-"] for r in (none, one, many)])
    for r in (none, one, many):
        for problem in r.problems:
            print(f"  {r.name}: {problem}")
    checks = [
        (f"web CPU per 10 clients beyond the first: {per10:.2f} % of a core", per10 <= CPU_PER_10_TARGET_PCT,
         f"<= {CPU_PER_10_TARGET_PCT} %"),
        (f"every client saw every byte in order: {many.ok_clients}/{many.clients}",
         many.ok_clients == many.clients and one.ok_clients == 1, "all"),
        (f"daemon pickup p50 with {many.clients} watchers: {pickup[2]:.0f} ms vs {pickup[0]:.0f} ms with none "
         f"({pickup[2] / max(pickup[0], 1):.2f}x)", pickup[2] <= max(pickup[0] * DAEMON_TARGET, pickup[0] + 1),
         "<= 1.10x"),
        (f"daemon throughput (300 jobs) with {many.clients} watchers: {many.burst_jobs_per_s:.0f} jobs/s vs "
         f"{none.burst_jobs_per_s:.0f}/s ({many.burst_jobs_per_s / none.burst_jobs_per_s:.2f}x)",
         many.burst_jobs_per_s >= none.burst_jobs_per_s / DAEMON_TARGET, ">= 0.91x"),
        (f"event latency p50: SSE {h.percentile(sse_ms, 50):.1f} ms (p95 {h.percentile(sse_ms, 95):.1f}, "
         f"p99 {h.percentile(sse_ms, 99):.1f}) vs polling every 100 ms {h.percentile(poll_ms, 50):.1f} ms "
         f"(p95 {h.percentile(poll_ms, 95):.1f}); {len(sse_ms)}/{args.events} changes seen",
         h.percentile(sse_ms, 50) <= LATENCY_P50_TARGET_MS and len(sse_ms) == args.events,
         f"p50 <= {LATENCY_P50_TARGET_MS:g} ms"),
    ]
    print()
    for text, ok, target in checks:
        print(f"{h.verdict(ok)}  {text}  (target {target})")
    print(f"\nweb RSS: idle {idle_rss / 1024:.1f} MiB, peak with {many.clients} clients {many.rss_kib / 1024:.1f} MiB; "
          f"idle CPU {idle_cpu:.2f} % of a core; baselines: idle Python with asyncio+sqlite3 {bare / 1024:.1f} MiB, "
          f"with Starlette+uvicorn imported {libs / 1024:.1f} MiB")
    return 0 if all(ok for _, ok, _ in checks) else 1


def entry(args: argparse.Namespace) -> int:
    if args.role == "writer":
        return role_writer(args.rate, args.seconds)
    if args.role == "clients":
        return role_clients(args)
    if args.role == "poller":
        return role_poller(args)
    return main(args)


if __name__ == "__main__":
    h.run(entry, parse_args())
