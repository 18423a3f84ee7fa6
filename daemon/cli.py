"""The `nexus-jobd` command: run the daemon, and submit, inspect, follow and cancel jobs."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import anyio

from daemon import __version__, config, service
from daemon import logging as log
from daemon.errors import ConfigError, DatabaseRewritten, JobdError
from daemon.store import JobStatus, Store, now_ms

_MARKER = re.compile(r"\n\[nexus-jobd: \d+ bytes of \w+ omitted; (\d+) bytes in all\]\n")
_FOLLOW_POLL_S = 0.1


# -- helpers ----------------------------------------------------------------------------------------------

async def _open(cfg: config.Config) -> Store:
    """An existing database only: a typo in --db must not create an empty one that no daemon reads."""
    store = await Store.open(cfg.db_path, busy_timeout_ms=cfg.busy_timeout_ms, create=False)
    await store.migrate()  # a database NexusCLI made and no daemon opened yet gets the daemon's columns
    return store


def _with_store(cfg: config.Config, action: Callable[[Store], Awaitable[int]]) -> int:
    async def main() -> int:
        store = await _open(cfg)
        try:
            return await action(store)
        finally:
            await store.close()

    return anyio.run(main)


def _age(ms: int | None) -> str:
    if not isinstance(ms, int):
        return "-"
    seconds = max(0, time.time() - ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _duration(ms: Any) -> str:
    return f"{ms / 1000:.2f}s" if isinstance(ms, int) else "-"


class _Follower:
    """Prints what a stream's column gained since the last look, even after the cap starts cutting it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.chars = 0  # characters of the column printed, while it holds everything
        self.position = 0  # bytes of the stream printed so far

    def update(self, text: str, total_bytes: int | None) -> None:
        total = total_bytes or 0
        match = None
        for match in _MARKER.finditer(text):  # noqa: B007 -- the last marker is the daemon's
            pass
        if match is None or int(match.group(1)) != total:
            self.out.write(text[self.chars:])
            self.chars = len(text)
            self.position = total
        else:
            head = text[: match.start()]
            if self.chars < len(head):  # the head was not all printed before the cap cut in
                self.out.write(head[self.chars:])
                self.chars = len(head)
                self.position = len(head.encode("utf-8", "surrogatepass"))
            tail = text[match.end():].encode("utf-8", "surrogatepass")
            new = total - self.position
            if new > len(tail):
                self.out.write(f"\n[nexus-jobd: {new - len(tail)} bytes not shown]\n")
            if new > 0:
                self.out.write(tail[-new:].decode("utf-8", "replace"))
            self.position = total
        self.out.flush()


def _ended(row: dict[str, Any]) -> bool:
    """Final, and nothing more will be written: the daemon recorded it, or no daemon holds it (cancelled while
    queued, or while waiting for a retry)."""
    if row["status"] not in {s.value for s in JobStatus if s.is_final}:
        return False
    return row.get("duration") is not None or row.get("worker_id") is None


async def _follow(store: Store, job_id: str, *, follow: bool) -> dict[str, Any]:
    out, err = _Follower(sys.stdout), _Follower(sys.stderr)
    attempt = None
    while True:
        row = await store.get_job(job_id)
        if row is None:
            raise JobdError(f"job {job_id} was deleted while being followed")
        if attempt is not None and row.get("attempt") != attempt and row["status"] != JobStatus.QUEUED:
            # A new attempt starts with empty output: follow it from its beginning.
            print(f"[nexus-jobd: attempt {row.get('attempt')}]", file=sys.stderr, flush=True)
            out, err = _Follower(sys.stdout), _Follower(sys.stderr)
        if row["status"] != JobStatus.QUEUED:
            attempt = row.get("attempt")
        out.update(row["stdout"] or "", row.get("stdout_bytes"))
        err.update(row["stderr"] or "", row.get("stderr_bytes"))
        if not follow or _ended(row):
            return row
        await anyio.sleep(_FOLLOW_POLL_S)


def _exit_code_of(row: dict[str, Any]) -> int:
    if row.get("error"):
        print(f"nexus-jobd: job {row['id']} {row['status']}: {row['error']}", file=sys.stderr)
    code = row.get("exit_code")
    if isinstance(code, int):
        return min(code, 255)
    return 0 if row["status"] == JobStatus.COMPLETED else 1


# -- commands ---------------------------------------------------------------------------------------------

def cmd_run(cfg: config.Config, args: argparse.Namespace) -> int:
    return anyio.run(service.serve, cfg, args.overrides)


def cmd_submit(cfg: config.Config, args: argparse.Namespace) -> int:
    # One argument is the command as written; several are argv the shell already split: quote them back.
    command = shlex.join(args.command) if len(args.command) > 1 else (args.command[0] if args.command else "")
    if not command.strip():
        raise JobdError("nothing to run: give the command after --, e.g. `nexus-jobd submit -- echo hi`")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise JobdError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value

    async def action(store: Store) -> int:
        run_after = now_ms() + int(args.delay * 1000) if args.delay else None
        depends_on = await store.resolve_id(args.depends_on) if args.depends_on else None
        job_id = await store.insert_job(node_id=args.node or cfg.local_node, tool=args.tool, command=command,
                                        cwd=args.cwd, env=env or None, priority=args.priority,
                                        timeout_ms=int(args.timeout * 1000) if args.timeout else None,
                                        max_attempts=args.max_attempts, run_after=run_after,
                                        depends_on=depends_on)
        print(job_id, file=sys.stderr if args.follow else sys.stdout, flush=True)
        if not args.follow:
            return 0
        return _exit_code_of(await _follow(store, job_id, follow=True))

    return _with_store(cfg, action)


def _ps_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("ID", "STATUS", "NODE", "TOOL", "EXIT", "TRY", "DURATION", "AGE", "COMMAND / ERROR")
    lines = [header]
    for row in rows:
        text = str(row["error"] if row["error"] and row["status"] != JobStatus.COMPLETED else row["command"])
        text = text.replace("\n", " ")
        lines.append((str(row["id"])[:8], str(row["status"]), str(row["node_id"]), str(row["tool"]),
                      "-" if row["exit_code"] is None else str(row["exit_code"]),
                      f"{row['attempt']}/{row['max_attempts']}", _duration(row["duration"]),
                      _age(row["created_at"]), text[:60] + ("…" if len(text) > 60 else "")))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)


def cmd_ps(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        rows = await store.list_jobs(status=args.status, node_id=args.node, limit=args.limit)
        print(json.dumps(rows, indent=2) if args.json else _ps_table(rows))
        return 0

    return _with_store(cfg, action)


def cmd_show(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        row = await store.get_job(await store.resolve_id(args.id))
        assert row is not None
        if args.json:
            print(json.dumps(row, indent=2))
            return 0
        lease = await _lease_holder(store, row.get("worker_id"))
        for key, value in row.items():
            if key == "worker_id" and value is not None:
                value = f"{value} ({lease})"
            if key in ("stdout", "stderr"):
                value = f"{len(value or '')} characters (`nexus-jobd logs {str(row['id'])[:8]}`)"
            elif key in ("created_at", "started_at", "completed_at", "run_after") and isinstance(value, int):
                value = f"{value}  ({_age(value)} ago)"
            print(f"{key:>14}: {'-' if value is None else value}")
        return 0

    return _with_store(cfg, action)


async def _lease_holder(store: Store, worker_id: Any) -> str:
    """How the daemon holding a job's claim is doing: its heartbeat age, or how it stopped."""
    for worker in await store.workers():
        if worker["id"] == worker_id:
            if worker["stopped_at"] is not None:
                return f"stopped: {worker['stop_reason']}"
            age_s = (worker["now"] - worker["heartbeat_at"]) / 1000
            return f"pid {worker['pid']} on {worker['host']}, heartbeat {age_s:.1f}s ago"
    return "unknown daemon"


def cmd_retry(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        job_id = await store.resolve_id(args.id)
        if not await store.retry(job_id):
            raise JobdError(f"job {job_id} has not ended: only completed, failed or cancelled jobs can be retried")
        print(f"{job_id}: queued again (attempt {(await store.get_job(job_id) or {}).get('attempt', 0) + 1})")
        return 0

    return _with_store(cfg, action)


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    """Every daemon registered on the database: alive or not, and what the queue looks like."""

    async def action(store: Store) -> int:
        workers, counts = await store.workers(), await store.job_counts()
        if args.json:
            print(json.dumps({"workers": workers, "jobs": counts}, indent=2))
            return 0
        print(f"{cfg.db_path}: {counts['executing']} running, {counts['queued']} queued, "
              f"{counts['finished_last_minute']} finished in the last minute, "
              f"{counts['finished_last_hour']} in the last hour")
        for w in workers:
            if w["stopped_at"] is not None:
                state = f"stopped {_age(w['stopped_at'])} ago ({w['stop_reason']})"
            elif w["now"] - w["heartbeat_at"] > cfg.lease_ttl_ms:
                state = f"NOT ANSWERING: last heartbeat {_age(w['heartbeat_at'])} ago"
            else:
                state = f"alive, up {_age(w['started_at'])}, {w['running']} running"
            print(f"  {w['id']}  pid {w['pid']} on {w['host']}: {state}")
        return 0

    return _with_store(cfg, action)


def cmd_nodes(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "check":
        if not args.id:
            raise JobdError("nodes check: which node? e.g. `nexus-jobd nodes check localhost`")
        return _check_node(cfg, args.id)

    async def action(store: Store) -> int:
        rows = await store.nodes_overview()
        for row in rows:
            caps = json.loads(row["capabilities"]) if row["capabilities"] else {}
            row["capabilities"] = caps
            row["heartbeat_age_s"] = (row["now"] - row["last_heartbeat"]) / 1000 if row["last_heartbeat"] else None
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        header = ("NODE", "STATUS", "HEARTBEAT", "RUNNING", "QUEUED", "TOOLS", "HOST / ERROR")
        lines = [header]
        for row in rows:
            caps = row["capabilities"]
            age = "-" if row["heartbeat_age_s"] is None else f"{row['heartbeat_age_s']:.0f}s ago"
            lines.append((str(row["id"]), str(row["status"]), age, str(row["running"]), str(row["queued"]),
                          ",".join(caps.get("tools", {})) or "-", str(caps.get("error") or row["hostname"])))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
        print("\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
                        for line in lines))
        return 0

    return _with_store(cfg, action)


def _check_node(cfg: config.Config, node_id: str) -> int:
    """Connect and probe one configured node now, without a daemon: its capabilities, or why it cannot be used."""
    from daemon import health, service

    node = cfg.nodes.get(node_id)
    if node is None:
        raise JobdError(f"no node {node_id!r} in {cfg.source}; configured: {', '.join(cfg.nodes)}")

    async def main() -> int:
        executors = service.executors_for(cfg)
        probe = health.Health(cfg, service.prober(cfg, executors))
        try:
            status, caps = (await probe.probe_all())[node_id]
        finally:
            for executor in executors.values():
                await executor.aclose()
        print(json.dumps({"node": node_id, "status": status, "capabilities": caps}, indent=2))
        if status != "online":
            print(f"nexus-jobd: node {node_id} is not usable: {caps.get('error')}", file=sys.stderr)
            return 1
        return 0

    return anyio.run(main)


def cmd_backup(cfg: config.Config, args: argparse.Namespace) -> int:
    target = Path(args.path).expanduser()

    async def action(store: Store) -> int:
        await store.backup(target)
        print(f"{cfg.db_path} -> {args.path}")
        return 0

    return _with_store(cfg, action)


_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _age_ms(text: str) -> int:
    match = re.fullmatch(r"(\d+)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number and a unit, e.g. 30d, 12h, 90m")
    return int(match.group(1)) * _UNITS_MS[match.group(2)]


def cmd_prune(cfg: config.Config, args: argparse.Namespace) -> int:
    statuses = args.status or ["completed", "failed", "cancelled"]

    async def action(store: Store) -> int:
        deleted = await store.prune(older_than_ms=args.older_than, statuses=statuses)
        print(f"deleted {deleted} {'/'.join(statuses)} jobs that ended more than {args.older_than_raw} ago")
        return 0

    return _with_store(cfg, action)


def cmd_logs(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        await _follow(store, await store.resolve_id(args.id), follow=args.follow)
        return 0

    return _with_store(cfg, action)


def cmd_cancel(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        ids = [await store.resolve_id(prefix) for prefix in args.ids]
        done = set(await store.cancel(ids))
        for job_id in ids:
            print(f"{job_id}: {'cancelled' if job_id in done else 'already finished, left as it is'}")
        return 0 if len(done) == len(ids) else 1

    return _with_store(cfg, action)


def cmd_db(cfg: config.Config, args: argparse.Namespace) -> int:
    async def main() -> int:
        store = await Store.open(cfg.db_path, busy_timeout_ms=cfg.busy_timeout_ms, create=args.action == "migrate")
        try:
            if args.action == "migrate":
                applied = await store.migrate()
                print(f"{cfg.db_path}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
                return 0
            problems = await store.check()
            for problem in problems:
                print(f"{cfg.db_path}: {problem}")
            if not problems:
                print(f"{cfg.db_path}: ok")
            return 1 if problems else 0
        finally:
            await store.close()

    return anyio.run(main)


# -- parser -----------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nexus-jobd", description="Run jobs queued in the SQLite `jobs` table.")
    p.add_argument("--version", action="version", version=f"nexus-jobd {__version__}")
    p.add_argument("--config", help=f"config file (default: $NEXUS_JOBD_CONFIG or {config.DEFAULT_CONFIG_PATH})")
    p.add_argument("--db", help=f"database file (default: $NEXUS_JOBD_DB or {config.DEFAULT_DB_PATH})")
    p.add_argument("--log-level", choices=config.LOG_LEVELS)
    p.add_argument("--log-format", choices=config.LOG_FORMATS)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="queue a job; prints its id")
    s.add_argument("--node", help="node id (default: the local node)")
    s.add_argument("--tool", default="bash", choices=config.TOOLS)
    s.add_argument("--cwd", help="working directory (default: the daemon's default_cwd)")
    s.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="extra variable (repeatable)")
    s.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    s.add_argument("--timeout", type=float, metavar="SECONDS", help="fail with exit code 124 after this long")
    s.add_argument("--max-attempts", type=int, default=1, metavar="N", help="retry failures up to N attempts in all")
    s.add_argument("--delay", type=float, metavar="SECONDS", help="do not start before this many seconds from now")
    s.add_argument("--depends-on", metavar="ID", help="start only after this job completed (fail if it does not)")
    s.add_argument("--follow", "-f", action="store_true", help="stream the output; exit with the job's code")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    s.set_defaults(func=cmd_submit)

    s = sub.add_parser("ps", help="list jobs, newest first")
    s.add_argument("--status", choices=[st.value for st in JobStatus])
    s.add_argument("--node")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("show", help="every column of one job")
    s.add_argument("id", help="job id or a unique prefix")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("logs", help="print a job's stdout and stderr")
    s.add_argument("id", help="job id or a unique prefix")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    s.set_defaults(func=cmd_logs)

    s = sub.add_parser("retry", help="queue a finished job again as a new attempt")
    s.add_argument("id", help="job id or a unique prefix")
    s.set_defaults(func=cmd_retry)

    s = sub.add_parser("cancel", help="cancel queued or running jobs (as NexusCLI does)")
    s.add_argument("ids", nargs="+", metavar="ID", help="job id or a unique prefix")
    s.set_defaults(func=cmd_cancel)

    s = sub.add_parser("nodes", help="nodes: status, heartbeat, jobs, tools; `nodes check ID` probes one now")
    s.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    s.add_argument("id", nargs="?", help="with check: the node to probe")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_nodes)

    s = sub.add_parser("status", help="the daemons on this database and the state of the queue")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("backup", help="copy the database safely while it is in use (SQLite online backup)")
    s.add_argument("path", help="the new file to write")
    s.set_defaults(func=cmd_backup)

    s = sub.add_parser("prune", help="delete finished jobs older than an age")
    s.add_argument("--older-than", dest="older_than_raw", required=True, metavar="AGE", help="e.g. 30d, 12h, 90m")
    s.add_argument("--status", action="append", choices=["completed", "failed", "cancelled"],
                   help="only jobs with this status (repeatable; default: all finished ones)")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("db", help="database maintenance")
    s.add_argument("action", choices=["migrate", "check"], help="migrate: create/upgrade; check: verify")
    s.set_defaults(func=cmd_db)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "submit" and args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if args.cmd == "prune":
        try:
            args.older_than = _age_ms(args.older_than_raw)
        except argparse.ArgumentTypeError as e:
            print(f"nexus-jobd prune: --older-than {e}", file=sys.stderr)
            return 2
    try:
        args.overrides = config.Overrides(config_path=args.config, db_path=args.db, log_level=args.log_level,
                                          log_format=args.log_format)
        cfg = config.load(args.overrides)
        log.configure(cfg.log_level if args.cmd == "run" else "warning", cfg.log_format)
        code: int = args.func(cfg, args)
        return code
    except ConfigError as e:
        print(f"nexus-jobd: configuration error: {e}", file=sys.stderr)
        return 2
    except DatabaseRewritten as e:
        print(f"nexus-jobd: {e}", file=sys.stderr)
        return service.EXIT_DATABASE_REWRITTEN
    except JobdError as e:
        print(f"nexus-jobd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
