"""The `nexus-jobd` command: run the daemon, and submit, inspect, follow and cancel jobs."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import anyio

from daemon import __version__, config, service
from daemon import logging as log
from daemon.errors import ConfigError, DatabaseError, DatabaseRewritten, JobdError
from daemon.model import STRANDED_FIX, JobStatus, stranded
from daemon.store import WORKERS_KEPT_MS, DbError, Store, open_store, rewrites
from daemon.tools import MAX_ATTEMPTS, MAX_TIMEOUT_MS

_MARKER = re.compile(r"\n\[nexus-jobd: \d+ bytes of \w+ omitted; (\d+) bytes in all\]\n")
_FOLLOW_POLL_S = 0.1
_DAEMON_CHECK_S = 1.0  # while following: how often to look for a live daemon that serves the job's node
_NO_DAEMON_REPEAT_S = 15.0  # and how often to say again that there is none
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # SQLite's INTEGER
_UNITS_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_STRANDED_SHOWN = 10  # rows no daemon runs: how many `db check` and `status` name
_MAX_AGE_DAYS = 36500  # prune --older-than: a century; no job ended longer ago than that
# C0 and C1 controls and DEL but newline and tab, and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


# -- helpers ----------------------------------------------------------------------------------------------

async def _open(cfg: config.Config, *, writes: bool) -> Store:
    """An existing database only: a typo in --db must not create an empty one that no daemon reads. A command
    that only reads opens the file read-only (it leaves no WAL behind, and works on a file this user may not
    write), unless it must be migrated first."""
    store = await open_store(cfg.db_target, busy_timeout_ms=cfg.busy_timeout_ms, create=False,
                             read_only_ok=not writes, reads_only=not writes)
    if store.read_only:
        return store
    try:
        await store.migrate()  # a database NexusCLI made and no daemon opened yet gets the daemon's columns
    except BaseException as e:
        await store.close()  # else aiosqlite's thread (not a daemon thread) keeps the process alive for ever
        if isinstance(e, DbError):
            raise DatabaseError(f"{cfg.db_name}: not a usable database: adding the daemon's tables and columns "
                                f"failed: {e}") from e
        raise
    return store


def _with_store(cfg: config.Config, action: Callable[[Store], Awaitable[int]], *, writes: bool) -> int:
    async def main() -> int:
        store = await _open(cfg, writes=writes)
        try:
            return await action(store)
        finally:
            await store.close()

    return anyio.run(main)


def _raw(value: Any) -> str:
    """A value as text. TEXT that is not valid UTF-8 comes from the store as bytes: shown with a \\xNN escape for
    each byte that does not decode (`job\\xff`), never as Python's b'...'."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _text(value: Any) -> str:
    """A value as a person reads it on a terminal: control characters escaped (`\\x1b]0;...`), since any writer
    of the database (or a node, through its error) could otherwise retitle, clear or rewrite the screen. Only
    `logs` prints a job's output as it wrote it, and --json leaves escaping to JSON."""
    return _CONTROL.sub(_escaped, _raw(value))


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return _raw(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=_json_default)


def _age(ms: int | None) -> str:
    if not isinstance(ms, int):
        return "-"
    seconds = max(0, time.time() - ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _when(ms: int) -> str:
    """An epoch-ms time as `show` gives it: `3m 5s ago`, or `in 59m 58s` (a run_after still to come)."""
    seconds = time.time() - ms / 1000
    return f"{_span(seconds)} ago" if seconds >= 0 else f"in {_span(-seconds)}"


def _span(seconds: float) -> str:
    """Whole seconds in the two largest units they fill: `12s`, `59m 58s`, `2d 3h`."""
    total = int(seconds)
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for (unit, size), (small, small_size) in itertools.pairwise(units):
        if total >= size:
            return f"{total // size}{unit} {total % size // small_size}{small}"
    return f"{total}s"


def _short_ids(ids: Sequence[str]) -> list[str]:
    """Each id cut to the fewest characters (8 at least) that tell it from every other id listed: a prefix that
    `show`, `logs` or `cancel` take. Among the ids in sorted order, only its neighbours share more of its start."""
    order = sorted(range(len(ids)), key=ids.__getitem__)
    cut = [8] * len(ids)
    for a, b in itertools.pairwise(order):
        if ids[a] != ids[b]:
            first, second = ids[a], ids[b]
            shared = next((i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y),
                          min(len(first), len(second))) + 1
            cut[a], cut[b] = max(cut[a], shared), max(cut[b], shared)
    return [text[:n] for text, n in zip(ids, cut, strict=True)]


def _duration(ms: Any) -> str:
    return f"{ms / 1000:.2f}s" if isinstance(ms, int) else "-"


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    lines = [header, *(tuple(cell.replace("\n", " ").replace("\t", " ") for cell in row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)) + "  " + line[-1]
                     for line in lines)


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


@dataclass
class _Watch:
    """A followed job as last seen (what to say on Ctrl-C), and when we last said that no daemon serves it."""

    job_id: Any = None
    status: Any = None
    checked_at: float = -math.inf  # monotonic time of the last look for a live daemon
    warned_at: float | None = None  # when we last said there is none; None since one was seen


async def _follow(store: Store, cfg: config.Config, job_id: Any, *, follow: bool,
                  watch: _Watch | None = None, new_job: bool = False) -> dict[str, Any]:
    """Print the job's output (each attempt's under its own marker) and, with `follow`, what it gains until the
    row is final. `new_job`: nothing of it was shown yet, not even of a first attempt that ends before the first
    look (`submit -f`)."""
    watch = watch or _Watch()
    watch.job_id = job_id
    out, err = _Follower(sys.stdout), _Follower(sys.stderr)
    shown: Any = 0 if new_job else None  # the attempt whose output the followers hold
    while True:
        row = await store.get_job(job_id)
        if row is None:
            raise JobdError(f"job {_text(job_id)} was deleted while being followed")
        watch.status = row["status"]
        attempt = row.get("attempt")
        # Whatever the status: a row queued again for a retry still holds the attempt that just failed.
        if attempt != shown and (row["stdout"] or row["stderr"] or row["status"] != JobStatus.QUEUED):
            if shown is not None:
                _attempt_marker(shown, attempt)
            out, err = _Follower(sys.stdout), _Follower(sys.stderr)
            shown = attempt
        out.update(_raw(row["stdout"] or ""), row.get("stdout_bytes"))
        err.update(_raw(row["stderr"] or ""), row.get("stderr_bytes"))
        if not follow or _ended(row):
            return row
        await _say_if_unserved(store, cfg, row, watch)
        await anyio.sleep(_FOLLOW_POLL_S)


def _attempt_marker(shown: Any, attempt: Any) -> None:
    """A new attempt starts with empty output: say so before following it from its beginning; and say when one
    ran wholly between two looks (a claim clears the row's output, so its output cannot be shown any more)."""
    missed = ""
    if isinstance(shown, int) and isinstance(attempt, int) and attempt - shown > 1:
        gone = f"{shown + 1}" if attempt - shown == 2 else f"{shown + 1} to {attempt - 1}"
        missed = f" (attempt {gone} ran between two looks: its output is gone)"
    if shown or missed:  # before the first attempt there is nothing to set apart
        print(f"[nexus-jobd: attempt {_text(attempt)}]{missed}", file=sys.stderr, flush=True)


async def _say_if_unserved(store: Store, cfg: config.Config, row: dict[str, Any], watch: _Watch) -> None:
    """While a followed job has not ended and no live daemon serves its node, say so on stderr: at once, then
    every _NO_DAEMON_REPEAT_S seconds (a follower would otherwise wait in silence for ever)."""
    now = time.monotonic()
    if now - watch.checked_at < _DAEMON_CHECK_S:
        return
    watch.checked_at = now
    # A started row is served where it runs: a pool's member (ran_on), whose daemons list it as a node.
    node = row["node_id"] if row["status"] == JobStatus.QUEUED or row.get("ran_on") is None else row["ran_on"]
    if await store.live_daemons_serving(node, lease_ttl_ms=cfg.lease_ttl_ms) or (
            row["status"] == JobStatus.QUEUED and await _any_live_daemon(store, cfg)):
        watch.warned_at = None  # a live daemon that serves other nodes fails the row at once as an unknown node
        return
    if watch.warned_at is not None and now - watch.warned_at < _NO_DAEMON_REPEAT_S:
        return
    watch.warned_at = now
    state = "queued" if row["status"] == JobStatus.QUEUED else str(row["status"])
    print(f"nexus-jobd: no live daemon serves node '{_text(row['node_id'])}' on {cfg.db_name}: job "
          f"{_text(row['id'])} stays {state} until one does (start one with `nexus-jobd run`; `nexus-jobd status` "
          "lists the daemons)", file=sys.stderr, flush=True)


async def _any_live_daemon(store: Store, cfg: config.Config) -> bool:
    return any(w["stopped_at"] is None and w["now"] - w["heartbeat_at"] <= cfg.lease_ttl_ms
               for w in await store.workers())


def _exit_code_of(row: dict[str, Any]) -> int:
    if row.get("error"):
        print(f"nexus-jobd: job {_text(row['id'])} {row['status']}: {_text(row['error'])}", file=sys.stderr)
    code = row.get("exit_code")
    if isinstance(code, int):
        return min(code, 255)
    return 0 if row["status"] == JobStatus.COMPLETED else 1


# -- commands ---------------------------------------------------------------------------------------------

def cmd_run(cfg: config.Config, args: argparse.Namespace) -> int:
    return anyio.run(service.serve, cfg, args.overrides)


def cmd_submit(cfg: config.Config, args: argparse.Namespace) -> int:
    node = args.node or cfg.local_node
    cwd = args.cwd
    if cwd is not None and node == cfg.local_node:
        # Relative to where the user typed it, not to the daemon's directory. A remote node's relative cwd stays
        # relative: to the login directory there.
        cwd = os.path.abspath(cwd)
    watch = _Watch()

    async def action(store: Store) -> int:
        depends_on = await store.resolve_id(args.depends_on) if args.depends_on is not None else None
        job_id = await store.insert_job(node_id=node, tool=args.tool, command=args.command_text, cwd=cwd,
                                        env=dict(args.env) or None, priority=args.priority,
                                        timeout_ms=args.timeout_ms, max_attempts=args.max_attempts,
                                        delay_ms=args.delay_ms or None, depends_on=depends_on)
        print(job_id, file=sys.stderr if args.follow else sys.stdout, flush=True)
        if not args.follow:
            return 0
        watch.job_id = job_id
        return _exit_code_of(await _follow(store, cfg, job_id, follow=True, watch=watch, new_job=True))

    try:
        return _with_store(cfg, action, writes=True)
    except KeyboardInterrupt:
        if watch.job_id is not None and watch.status in (JobStatus.QUEUED, JobStatus.EXECUTING, None):
            state = "running" if watch.status == JobStatus.EXECUTING else "queued"
            print(f"nexus-jobd: stopped following; job {watch.job_id} was left {state} (a daemon "
                  f"{'still runs it' if state == 'running' else 'will run it'}): cancel it with "
                  f"`nexus-jobd cancel {watch.job_id}`", file=sys.stderr, flush=True)
        return 130


def _ps_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("ID", "STATUS", "NODE", "TOOL", "EXIT", "TRY", "DURATION", "AGE", "COMMAND / ERROR")
    lines = []
    ids = _short_ids(["NULL" if row["id"] is None else _text(row["id"]) for row in rows])
    for row, job_id in zip(rows, ids, strict=True):
        text = _text(row["error"] if row["error"] and row["status"] != JobStatus.COMPLETED else row["command"])
        text = text.replace("\n", " ")
        lines.append((job_id, _text(row["status"]), _where(row), _text(row["tool"]),
                      "-" if row["exit_code"] is None else _text(row["exit_code"]),
                      f"{_text(row['attempt'])}/{_text(row['max_attempts'])}", _duration(row["duration"]),
                      _age(row["created_at"]), text[:60] + ("…" if len(text) > 60 else "")))
    return _table(header, lines)


def _where(row: dict[str, Any]) -> str:
    """The node a row asked for, and where its latest attempt ran when that is another (a pool's member)."""
    asked, ran_on = _text(row["node_id"]), row.get("ran_on")
    return asked if ran_on is None or ran_on == row["node_id"] else f"{asked}→{_text(ran_on)}"


def cmd_ps(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        rows = await store.list_jobs(status=args.status, node_id=args.node, limit=args.limit)
        print(_dumps(rows) if args.json else _ps_table(rows))
        return 0

    return _with_store(cfg, action, writes=False)


def cmd_show(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        job_id = await store.resolve_id(args.id)  # as the store has it: bytes for an id that is not UTF-8
        row = await store.get_job(job_id)
        if row is None:
            raise JobdError(f"job {_text(job_id)} was deleted just now")
        if args.json:
            print(_dumps(row))
            return 0
        lease = await _lease_holder(store, row.get("worker_id"))
        for key, value in row.items():
            shown = "-" if value is None else _text(value)
            if key == "worker_id" and value is not None:
                shown = f"{shown} ({lease})"
            if key in ("stdout", "stderr"):
                shown = f"{len(_raw(value or ''))} characters (`nexus-jobd logs {_text(row['id'])[:8]}`)"
            elif key in ("created_at", "started_at", "completed_at", "run_after") and isinstance(value, int):
                shown = f"{value}  ({_when(value)})"
            print(f"{key:>14}: {shown}")
        return 0

    return _with_store(cfg, action, writes=False)


async def _lease_holder(store: Store, worker_id: Any) -> str:
    """How the daemon holding a job's claim is doing: its heartbeat age, or how it stopped."""
    for worker in await store.workers():
        if worker["id"] == worker_id:
            if worker["stopped_at"] is not None:
                return f"stopped: {_text(worker['stop_reason'])}"
            age_s = (worker["now"] - worker["heartbeat_at"]) / 1000
            return f"pid {_text(worker['pid'])} on {_text(worker['host'])}, heartbeat {age_s:.1f}s ago"
    return (f"no daemon of this database (a stopped one is forgotten {WORKERS_KEPT_MS // 86_400_000} days after it "
            "stopped)")


def cmd_retry(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        job_id = await store.resolve_id(args.id)
        row = await store.retry(job_id)
        if row is None:
            raise JobdError(f"job {_text(job_id)} has not ended: only completed, failed or cancelled jobs can be "
                            "retried")
        attempt = row["attempt"] if isinstance(row["attempt"], int) else 0
        print(f"{_text(job_id)}: queued again (attempt {attempt + 1} of {_text(row['max_attempts'])})")
        return 0

    return _with_store(cfg, action, writes=True)


def _print_rewrite_report(report: dict[str, Any]) -> None:
    """What the last daemon found when another program rewrote the database, and what it did (README: When another
    program rewrites the database)."""
    print(f"STOPPED {_age(report.get('detected_at'))} ago: {_text(report.get('message'))}")
    for label, key in (("not recorded in the database", "not_recorded"), ("were running", "running")):
        if report.get(key):
            print(f"  jobs {label}: {', '.join(_text(i) for i in report[key])}")
    if report.get("results"):
        print(f"  their results: {_text(report['results'])}")
    print(f"  the daemon's WAL, set aside: {', '.join(_text(p) for p in report.get('wal_set_aside') or []) or '-'}")
    if report.get("applied_at") is not None:
        print(f"  applied to the file {_age(report['applied_at'])} ago by the next daemon")
    print(f"  report: {_text(report.get('report'))}")


def _worker_state(w: dict[str, Any], cfg: config.Config) -> str:
    if w["stopped_at"] is not None:
        return f"stopped {_age(w['stopped_at'])} ago ({_text(w['stop_reason'])})"
    if w["now"] - w["heartbeat_at"] > cfg.lease_ttl_ms:
        return f"NOT ANSWERING: last heartbeat {_age(w['heartbeat_at'])} ago"
    return f"alive, up {_age(w['started_at'])}, {w['running']} running"


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    """Every daemon registered on the database: alive or not, and what the queue looks like; first, if the last
    daemon stopped because another program rewrote the file, what it found (even when the file cannot be opened)."""
    report = rewrites.latest_report(cfg.db_path) if cfg.db_url is None else None  # only a file can be rewritten

    async def action(store: Store) -> int:
        workers, counts = await store.workers(), await store.job_counts()
        pools = await store.pools_overview(_configured_pools(cfg))
        total, left = await _stranded(store)
        nonlocal report
        if report is not None and any(w["started_at"] > (report.get("detected_at") or 0) for w in workers):
            report = None  # a daemon started since: that stop is history
        if args.json:
            print(_dumps({"workers": workers, "jobs": counts | {"stranded": total}, "stranded": left,
                          "rewritten": report, "pools": pools}))
            return 0
        if report is not None:
            _print_rewrite_report(report)
        print(f"{cfg.db_name}: {counts['executing']} running, {counts['queued']} queued, "
              f"{counts['finished_last_minute']} finished in the last minute, "
              f"{counts['finished_last_hour']} in the last hour")
        if total:
            print(f"  {_stranded_line(total, left)}")
        for w in workers:
            print(f"  {_text(w['id'])}  pid {_text(w['pid'])} on {_text(w['host'])}: {_worker_state(w, cfg)}")
        for pool in pools:
            print(f"  pool {_text(pool['id'])}: {pool['queued']} queued; "
                  f"{', '.join(_member_text(m) for m in pool['members'])}")
        return 0

    try:
        return _with_store(cfg, action, writes=False)
    except DatabaseRewritten:
        if report is not None:  # the file cannot even be opened: the report is all there is to show
            _print_rewrite_report(report)
        raise


def _capabilities(text: Any) -> dict[str, Any]:
    """A node's capabilities column (JSON written by a daemon); what another program put there is shown as such."""
    try:
        caps = json.loads(text) if text else {}
    except ValueError:
        return {"error": f"capabilities are not JSON: {_text(text)[:60]!r}"}
    return caps if isinstance(caps, dict) else {"error": "capabilities are not a JSON object"}


def cmd_nodes(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "check":
        return _check_node(cfg, args.id)

    async def action(store: Store) -> int:
        rows = await store.nodes_overview()
        if args.id is not None:
            known = ", ".join(_text(row["id"]) for row in rows) or "no node yet"
            rows = [row for row in rows if row["id"] == args.id]
            if not rows:
                raise JobdError(f"no node {args.id!r} in the nodes table; it has: {known}")
        pools = await store.pools_overview(_configured_pools(cfg))
        for row in rows:
            row["capabilities"] = _capabilities(row["capabilities"])
            row["heartbeat_age_s"] = (row["now"] - row["last_heartbeat"]) / 1000 if row["last_heartbeat"] else None
            row["pools"] = [pool["id"] for pool in pools if any(m["id"] == row["id"] for m in pool["members"])]
        if args.json:
            print(_dumps(rows))
            return 0
        header = ("NODE", "STATUS", "HEARTBEAT", "RUNNING", "QUEUED", "TOOLS", "HOST / ERROR")
        lines = []
        for row in rows:
            caps = row["capabilities"]
            age = "-" if row["heartbeat_age_s"] is None else f"{row['heartbeat_age_s']:.0f}s ago"
            tools = caps.get("tools")
            lines.append((_text(row["id"]), _text(row["status"]), age, str(row["running"]), str(row["queued"]),
                          ",".join(map(_text, tools)) if isinstance(tools, dict | list) and tools else "-",
                          _text(caps.get("error") or row["hostname"])))
        print(_table(header, lines))
        if pools and args.id is None:
            print()
            print(_pools_table(pools))
        return 0

    return _with_store(cfg, action, writes=False)


def _configured_pools(cfg: config.Config) -> dict[str, tuple[str, ...]]:
    return {pool.id: pool.members for pool in cfg.pools.values()}


def _pools_table(pools: Sequence[dict[str, Any]]) -> str:
    """Each pool, its queued rows, how many daemons serve it, and each member's state and load."""
    header = ("POOL", "QUEUED", "DAEMONS", "MEMBERS (status, running jobs, load)")
    return _table(header, [(_text(pool["id"]), str(pool["queued"]), str(len(pool["daemons"])),
                            ", ".join(_member_text(m) for m in pool["members"])) for pool in pools])


def _member_text(member: dict[str, Any]) -> str:
    load = "-" if member["load"] is None else f"{member['load']:.2f}"
    return f"{_text(member['id'])} {_text(member['status'])} {member['running']} {load}"


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


def cmd_doctor(cfg: config.Config, args: argparse.Namespace) -> int:
    """What this set-up lacks (on Termux: the service, boot, wake lock, battery, phantom process killer; everywhere:
    SQLite's locking on the database's filesystem): exit 1 if something is missing or does not work."""
    from daemon.android import doctor

    findings = doctor.examine(cfg, Path.home())
    if args.json:
        print(_dumps({"termux": cfg.android.termux, "checks": [f.as_dict() for f in findings]}))
    else:
        if not cfg.android.termux:
            print("not on Termux (no TERMUX_VERSION, $PREFIX not under com.termux): the Android checks do not apply")
        for finding in findings:
            print(f"{finding.state:<8} {finding.check}: {finding.detail}")
            if finding.fix and finding.state != doctor.OK:
                print(f"{'':<8} fix: {finding.fix}")
    return 1 if any(f.state in (doctor.MISSING, doctor.FAILED) for f in findings) else 0


def cmd_backup(cfg: config.Config, args: argparse.Namespace) -> int:
    target = Path(args.path).expanduser()
    if cfg.db_url is not None:
        raise JobdError(f"{cfg.db_name} is a PostgreSQL database: back it up with PostgreSQL's own tools, e.g. "
                        f"pg_dump -Fc -f {shlex.quote(args.path)} '{cfg.db_name}' (`nexus-jobd backup` copies "
                        "SQLite files only)")

    async def action(store: Store) -> int:
        await store.backup(target)
        print(f"{cfg.db_name} -> {args.path}")
        return 0

    return _with_store(cfg, action, writes=False)


def cmd_prune(cfg: config.Config, args: argparse.Namespace) -> int:
    statuses = args.status or ["completed", "failed", "cancelled"]

    async def action(store: Store) -> int:
        deleted = await store.prune(older_than_ms=args.older_than.ms, statuses=statuses)
        print(f"deleted {deleted} {'/'.join(statuses)} jobs that ended more than {args.older_than.text} ago")
        if forgotten := await store.prune_workers():
            print(f"forgot {forgotten} daemons that stopped more than {WORKERS_KEPT_MS // 86_400_000} days ago")
        total, _ = await _stranded(store, 1)
        if total:
            print(f"left {total} rows no daemon runs or finishes, which have not ended (`nexus-jobd db check` names "
                  "them; cancelled, they are pruned like any other)")
        return 0

    return _with_store(cfg, action, writes=True)


def cmd_logs(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        await _follow(store, cfg, await store.resolve_id(args.id), follow=args.follow)
        return 0

    return _with_store(cfg, action, writes=False)


def cmd_cancel(cfg: config.Config, args: argparse.Namespace) -> int:
    async def action(store: Store) -> int:
        ids = [await store.resolve_id(prefix) for prefix in args.ids]
        done = set(await store.cancel(ids))
        for job_id in ids:
            print(f"{_text(job_id)}: {'cancelled' if job_id in done else 'already finished, left as it is'}")
        return 0 if len(done) == len(ids) else 1

    return _with_store(cfg, action, writes=True)


def cmd_web(cfg: config.Config, args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise JobdError(f"the web console needs its libraries ({e.name} is missing): pip install 'nexus-jobd[web]' "
                        "into nexus-jobd's environment") from None
    from daemon.web import server

    cfg = server.with_listen(cfg, args.listen)
    if args.url:
        print(server.url(cfg))
        return 0
    return anyio.run(server.serve, cfg)


def cmd_db(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "migrate" and cfg.db_url is None and not cfg.db_path.exists():
        service.check_database_access(cfg)  # no database is created where `run` would refuse it
        service.check_database_locking(cfg)

    async def main() -> int:
        migrate = args.action in ("migrate", "take-over")
        store = await open_store(cfg.db_target, busy_timeout_ms=cfg.busy_timeout_ms, create=args.action == "migrate",
                                 read_only_ok=not migrate, reads_only=not migrate,
                                 take_over=args.action == "take-over")
        try:
            if args.action == "take-over":
                return await _take_over(cfg, store)
            if migrate:
                try:
                    applied = await store.migrate()
                except DbError as e:
                    raise DatabaseError(f"{cfg.db_name}: not a usable database: adding the daemon's tables and "
                                        f"columns failed: {e}") from e
                print(f"{cfg.db_name}: " + (f"applied {', '.join(applied)}" if applied else "up to date"))
                return 0
            problems = await store.check()
            if (found := await _stranded(store))[0]:
                problems.append(_stranded_line(*found))
            for problem in problems:
                print(f"{cfg.db_name}: {problem}")
            if not problems:
                print(f"{cfg.db_name}: ok" + _read_only_note(store))
            return 1 if problems else 0
        finally:
            await store.close()

    return anyio.run(main)


async def _stranded(store: Store, limit: int = _STRANDED_SHOWN) -> tuple[int, list[dict[str, Any]]]:
    """Rows no daemon runs or finishes (a status typo, an `executing` row under no daemon): how many, and the first
    `limit`; none where the schema lacks what the look needs (check() says so)."""
    try:
        return await store.stranded_jobs(limit=max(limit, 1))
    except DbError:
        return 0, []


def _stranded_line(total: int, rows: Sequence[dict[str, Any]]) -> str:
    more = f", and {total - len(rows)} more" if total > len(rows) else ""
    return (f"{total} rows no daemon runs or finishes: {', '.join(_text(stranded(r)) for r in rows)}{more}; "
            f"{STRANDED_FIX}")


def _read_only_note(store: Store) -> str:
    if store.read_only_fs is not None:
        return f" (read-only: the filesystem at {store.read_only_fs} is mounted read-only)"
    return " (read-only for this user)" if store.write_denied else ""


async def _take_over(cfg: config.Config, store: Store) -> int:
    """The file in WAL mode with the daemon's tables, whatever program wrote it last (the user says none that
    rewrites it whole does any more); what daemons kept beside it is applied when the next daemon starts."""
    applied = await store.migrate()
    print(f"{cfg.db_name}: taken over: in WAL mode" + (f", applied {', '.join(applied)}" if applied else "")
          + "; from now on only programs that use SQLite's locking may write it")
    report = rewrites.latest_report(cfg.db_path) if cfg.db_url is None else None
    if report is not None and report.get("applied_at") is None:
        print(f"the results a daemon kept beside it ({_text(report.get('report'))}) are recorded when the next "
              "daemon starts")
    return 0


# -- argument types: a bad value is a usage error (exit 2) that says what is expected --------------------

def _nonempty(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty {what} names nothing; give one")
        return text

    return parse


def _integer(low: int, high: int, meaning: str = "") -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: expected an integer from {low} to "
                                             f"{high}{meaning}")
        return value

    return parse


def _seconds_ms(low_ms: int, high_ms: int) -> Callable[[str], int]:
    """Seconds as typed (a decimal number) -> whole milliseconds, within [low_ms, high_ms] after the rounding."""
    expected = f"expected seconds from {low_ms / 1000:g} to {high_ms // 1000} (a year)"

    def parse(text: str) -> int:
        try:
            seconds = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {expected}") from None
        if not math.isfinite(seconds):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; {expected}")
        if not low_ms <= seconds * 1000 <= high_ms:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; {expected}")
        ms = round(seconds * 1000)
        if not low_ms <= ms <= high_ms:
            raise argparse.ArgumentTypeError(f"{text!r} is {ms} ms once rounded to milliseconds; {expected}")
        return ms

    return parse


def _env_item(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


class _Age(NamedTuple):
    ms: int
    text: str


def _age_arg(text: str) -> _Age:
    match = re.fullmatch(r"(-?\d+)([smhd])", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number and a unit, e.g. 30d, 12h, 90m")
    number = int(match.group(1))
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an age cannot be negative (30d: jobs that ended more than "
                                         "30 days ago)")
    ms = number * _UNITS_MS[match.group(2)]
    if ms > _MAX_AGE_DAYS * _UNITS_MS["d"]:
        raise argparse.ArgumentTypeError(f"{text!r}: at most {_MAX_AGE_DAYS}d (no job ended longer ago)")
    return _Age(ms, text.strip())


# -- parser -----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An option's value that starts with '-' and a digit, '.', 'inf' or 'nan' (-5d, -1e3, -inf) is taken as its
    value, so its check can say what is wrong with it, instead of argparse's "expected one argument"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _global_options(parser: argparse.ArgumentParser, default: Any) -> None:
    """On the main parser (default None) and on every command (default SUPPRESS, so that not repeating an option
    there keeps the value given before the command): `nexus-jobd ps --db X` as well as `nexus-jobd --db X ps`."""
    path = _nonempty("path")
    parser.add_argument("--config", type=path, default=default,
                        help=f"config file (default: $NEXUS_JOBD_CONFIG or {config.DEFAULT_CONFIG_PATH})")
    parser.add_argument("--db", type=path, default=default, metavar="PATH|URL",
                        help="the SQLite database file, or a postgresql:// URL (default: $NEXUS_JOBD_DB or "
                             f"{config.DEFAULT_DB_PATH})")
    parser.add_argument("--log-level", choices=config.LOG_LEVELS, default=default)
    parser.add_argument("--log-format", choices=config.LOG_FORMATS, default=default)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="nexus-jobd", description="Run jobs queued as rows of a `jobs` table: in a SQLite file, or in "
                "a PostgreSQL database that daemons on several hosts share.")
    p.add_argument("--version", action="version", version=f"nexus-jobd {__version__}")
    _global_options(p, None)
    common = _Parser(add_help=False)
    _global_options(common, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def command(name: str, help: str, func: Callable[[config.Config, argparse.Namespace], int]
                ) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, parents=[common])
        s.set_defaults(func=func, usage_error=s.error)
        return s

    job_id = _nonempty("job id")
    command("run", "run the daemon in the foreground", cmd_run)

    s = command("submit", "queue a job; prints its id", cmd_submit)
    s.add_argument("--node", type=_nonempty("node id"), help="node id (default: the local node)")
    s.add_argument("--tool", default="bash", choices=config.TOOLS)
    s.add_argument("--cwd", type=_nonempty("directory"),
                   help="working directory, relative to this one (default: the daemon's default_cwd)")
    s.add_argument("--env", action="append", default=[], type=_env_item, metavar="NAME=VALUE",
                   help="extra variable (repeatable)")
    s.add_argument("--priority", type=_integer(_INT64_MIN, _INT64_MAX, " (SQLite's INTEGER)"), default=0,
                   help="higher runs first (default 0)")
    s.add_argument("--timeout", dest="timeout_ms", type=_seconds_ms(1, MAX_TIMEOUT_MS), metavar="SECONDS",
                   help="fail with exit code 124 after this long")
    s.add_argument("--max-attempts", type=_integer(1, MAX_ATTEMPTS), default=1, metavar="N",
                   help="retry failures up to N attempts in all")
    s.add_argument("--delay", dest="delay_ms", type=_seconds_ms(0, MAX_TIMEOUT_MS), metavar="SECONDS",
                   help="do not start before this many seconds from now")
    s.add_argument("--depends-on", type=job_id, metavar="ID",
                   help="start only after this job completed (fail if it does not)")
    s.add_argument("--follow", "-f", action="store_true", help="stream the output; exit with the job's code")
    s.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- COMMAND...: everything after -- is the job's, options included")

    s = command("ps", "list jobs, newest first", cmd_ps)
    s.add_argument("--status", choices=[st.value for st in JobStatus])
    s.add_argument("--node", type=_nonempty("node id"))
    s.add_argument("--limit", type=_integer(1, _INT64_MAX), default=20)
    s.add_argument("--json", action="store_true")

    s = command("show", "every column of one job", cmd_show)
    s.add_argument("id", type=job_id, help="job id or a unique prefix")
    s.add_argument("--json", action="store_true")

    s = command("logs", "print a job's stdout and stderr", cmd_logs)
    s.add_argument("id", type=job_id, help="job id or a unique prefix")
    s.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")

    s = command("retry", "queue a finished job again as a new attempt", cmd_retry)
    s.add_argument("id", type=job_id, help="job id or a unique prefix")

    s = command("cancel", "cancel queued or running jobs (as NexusCLI does)", cmd_cancel)
    s.add_argument("ids", nargs="+", type=job_id, metavar="ID", help="job id or a unique prefix")

    s = command("nodes", "nodes: status, heartbeat, jobs, tools; `nodes check ID` probes one now", cmd_nodes)
    s.add_argument("action", nargs="?", choices=["list", "check"], default="list")
    s.add_argument("id", nargs="?", type=_nonempty("node id"), help="with list: only this node; with check: the "
                   "node to probe")
    s.add_argument("--json", action="store_true")

    s = command("status", "the daemons on this database and the state of the queue", cmd_status)
    s.add_argument("--json", action="store_true")

    s = command("doctor", "what this set-up lacks: on Termux the service, boot, wake lock, battery and phantom "
                "process killer; everywhere whether SQLite's locking holds where the database is", cmd_doctor)
    s.add_argument("--json", action="store_true")

    s = command("backup", "copy the database safely while it is in use (SQLite online backup)", cmd_backup)
    s.add_argument("path", type=_nonempty("path"), help="the new file to write")

    s = command("prune", "delete finished jobs older than an age", cmd_prune)
    s.add_argument("--older-than", type=_age_arg, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m")
    s.add_argument("--status", action="append", choices=["completed", "failed", "cancelled"],
                   help="only jobs with this status (repeatable; default: all finished ones)")

    s = command("web", "serve the web console and HTTP API (the `web` extra: pip install 'nexus-jobd[web]')",
                cmd_web)
    s.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default: [web] listen, 127.0.0.1:9480)")
    s.add_argument("--url", action="store_true", help="print the login URL (with the token) and exit")

    s = command("db", "database maintenance", cmd_db)
    s.add_argument("action", choices=["migrate", "check", "take-over"],
                   help="migrate: create/upgrade; check: verify; take-over: use a file a whole-file writer (NexusCLI "
                        "0.10's sql.js) kept, once it no longer writes it")
    return p


def _check_usage(args: argparse.Namespace) -> None:
    """What argparse cannot check by itself; a usage error exits 2."""
    if args.cmd == "submit":
        words = args.command[1:] if args.command[:1] == ["--"] else args.command
        # One word is the command as written; several are argv the shell already split: quote them back.
        args.command_text = shlex.join(words) if len(words) > 1 else (words[0] if words else "")
        if not args.command_text.strip():
            args.usage_error("nothing to run: give the command after --, e.g. `nexus-jobd submit -- echo hi`")
    if args.cmd == "nodes" and args.action == "check" and not args.id:
        args.usage_error("nodes check: which node? e.g. `nexus-jobd nodes check localhost`")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check_usage(args)
    db = config.redact_url(args.db) if args.db else "the database"
    log_format = args.log_format or "auto"  # until the config says otherwise (a refusal may come before)
    try:
        args.overrides = config.Overrides(config_path=args.config, db_path=args.db, log_level=args.log_level,
                                          log_format=args.log_format)
        cfg = config.load(args.overrides)
        db, log_format = cfg.db_name, cfg.log_format
        log.configure(cfg.log_level if args.cmd in ("run", "web") else "warning", cfg.log_format)
        code: int = args.func(cfg, args)
        return code
    except ConfigError as e:
        return _refused(args, log_format, 2, f"configuration error: {e}")
    except DatabaseRewritten as e:
        return _refused(args, log_format, service.EXIT_DATABASE_REWRITTEN, _text(e))
    except JobdError as e:  # its message may quote a row's values
        return _refused(args, log_format, 1, _text(e))
    except DbError as e:  # one the store did not put in words: still one line, not a traceback
        return _refused(args, log_format, 1, f"{db}: database error: {_text(e)}")
    except KeyboardInterrupt:
        return 130


def _refused(args: argparse.Namespace, log_format: str, code: int, message: str) -> int:
    """Why the command stopped, in one line. The daemon's (`run`) goes to its log as an event when that log is JSON
    (--log-format json, or not a TTY: journald, svlogd), where a supervisor's log reader looks for it."""
    if args.cmd == "run" and (log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())):
        log.configure("info", "json")
        log.get("service").error("daemon.refused", message=message, exit_code=code)
    else:
        print(f"nexus-jobd: {message}", file=sys.stderr)
    return code
