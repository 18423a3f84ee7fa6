"""Prometheus metrics ([metrics]): what the daemon counts as it works, and the queue and nodes as they are when
someone looks; served as GET /metrics and/or written to a file for node_exporter's textfile collector.

prometheus_client is imported only when [metrics] is set: without it, `Hooks` record nothing and cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import platform
import tempfile
from collections.abc import Iterator, Mapping
from math import inf
from pathlib import Path
from typing import TYPE_CHECKING, cast

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from daemon import __version__, ticks
from daemon import logging as log
from daemon.config import TOOLS, Config
from daemon.errors import ConfigError, DatabaseRewritten
from daemon.hooks import Hooks
from daemon.store import DbError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

    from daemon.health import Health
    from daemon.model import ClaimedJob
    from daemon.store import Store

logger = log.get("metrics")
TEXTFILE_INTERVAL_S = 15.0
TEXTFILE_MODE = 0o644  # node_exporter runs as another user; the systemd unit's UMask=0077 would hide the file
DB_READ_TIMEOUT_S = 2.0  # a scrape answers without the queue gauges rather than wait on a stuck database
_UNREADABLE: tuple[type[Exception], ...] = (TimeoutError, DatabaseRewritten, OSError, *DbError)
REQUEST_TIMEOUT_S = 10.0
HEADER_TIMEOUT_S = 3.0  # a scraper sends its request at once: a connection silent this long is closed
MAX_CONNECTIONS = 64  # answered at once; more are closed as they come, so idle ones cannot take every descriptor
ACCEPT_ERROR_LOG_S = 10.0  # a failing accept (out of descriptors) is logged at most this often
MAX_REQUEST_HEAD = 16 * 1024
STATUSES = ("completed", "failed", "cancelled")
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, inf)
PICKUP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 3600, inf)


@dataclasses.dataclass(frozen=True)
class _Sample:
    """The gauges as of one look: replaced whole, so a collector in another thread never sees half of one."""

    queue: Mapping[tuple[str, str], int] | None  # (node, status) -> rows; None: the database did not answer
    nodes_up: Mapping[str, bool]
    heartbeat_ages_ms: Mapping[str, int]


class _Gauges:
    """A prometheus_client collector of the latest `_Sample`: queued/running per node, node up, heartbeat age."""

    def __init__(self, nodes: Mapping[str, object]) -> None:
        self.sample = _Sample(None, {}, {})
        self._nodes = nodes  # the configured nodes: their gauges show 0 rather than nothing

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        sample = self.sample
        if sample.queue is not None:
            for status, name, what in (("queued", "nexus_jobd_jobs_queued", "Rows waiting (status 'queued')"),
                                       ("executing", "nexus_jobd_jobs_running", "Rows running ('executing')")):
                family = GaugeMetricFamily(name, f"{what} per node, as the database has them", labels=["node"])
                counts = dict.fromkeys(self._nodes, 0) | {n: c for (n, s), c in sample.queue.items() if s == status}
                for node, count in sorted(counts.items()):
                    family.add_metric([node], count)
                yield family
        up = GaugeMetricFamily("nexus_jobd_node_up", "1 while the node is online (its probes answer), else 0",
                               labels=["node"])
        for node, online in sorted(sample.nodes_up.items()):
            up.add_metric([node], 1 if online else 0)
        yield up
        age = GaugeMetricFamily("nexus_jobd_node_heartbeat_age_seconds",
                                "Seconds since the node's last heartbeat in the nodes table", labels=["node"])
        for node, ms in sorted(sample.heartbeat_ages_ms.items()):
            age.add_metric([node], max(0, ms) / 1000)
        yield age


class Exporter(Hooks):
    """The daemon's metrics in a registry of its own, with HTTP serving and the textfile. Made at start-up by
    `open` (which binds the port, so a port in use stops start-up); `run` serves until cancelled."""

    def __init__(self, config: Config) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._settings_file = config.settings_file
        self._listen = config.metrics.listen
        self._textfile = config.metrics.textfile
        self.registry = CollectorRegistry()
        registry = self.registry
        self._finished = Counter("nexus_jobd_jobs_finished", "Jobs this daemon ran to a final status",
                                 ["node", "tool", "status"], registry=registry)
        self._duration = Histogram("nexus_jobd_job_duration_seconds", "Run time of finished jobs (the row's duration)",
                                   ["node", "tool"], buckets=DURATION_BUCKETS, registry=registry)
        self._pickup = Histogram("nexus_jobd_pickup_latency_seconds",
                                 "From queued to started (started_at - created_at), first attempts only", ["node"],
                                 buckets=PICKUP_BUCKETS, registry=registry)
        self._db_errors = Counter("nexus_jobd_db_write_errors", "Database errors logged as db.write_failed or "
                                  "dispatch.db_error", registry=registry)
        self._reconnects = Counter("nexus_jobd_ssh_reconnects", "SSH connections to a node opened again after the "
                                   "first", ["node"], registry=registry)
        self._killed_outside = Counter("nexus_jobd_jobs_killed_outside", "Local jobs that died by a SIGKILL "
                                       "nexus-jobd did not send (Android's phantom process killer, the OOM killer)",
                                       ["node"], registry=registry)
        self._killed_outside.labels(config.local_node)
        Gauge("nexus_jobd_build_info", "Always 1: the version of nexus-jobd and of Python", ["version", "python"],
              registry=registry).labels(__version__, platform.python_version()).set(1)
        for node in config.nodes.values():  # every series exists from the start: rate() needs the zero
            self._pickup.labels(node.id)
            if node.ssh is not None:
                self._reconnects.labels(node.id)
            for tool in node.tools:
                self._duration.labels(node.id, tool)
                for status in STATUSES:
                    self._finished.labels(node.id, tool, status)
        self._gauges = _Gauges(config.nodes)
        registry.register(cast("Collector", self._gauges))
        self._sampling = asyncio.Lock()
        self._store: Store | None = None
        self._health: Health | None = None
        self._server: asyncio.Server | None = None
        self._requests: set[asyncio.Task[object]] = set()
        self._textfile_error: str | None = None
        self._accept_errors = _AcceptErrors()

    @classmethod
    async def open(cls, config: Config) -> Exporter:
        """The exporter of `config.metrics`, its port bound (not yet answering) and its textfile's directory checked:
        what cannot work stops start-up here, as a ConfigError naming the key and the fix."""
        exporter = cls(config)
        exporter._check_textfile_dir()
        await exporter._bind()
        return exporter

    # -- what the daemon reports --------------------------------------------------------------------------

    def job_claimed(self, job: ClaimedJob) -> None:
        # A retry's created_at is its first attempt's: only first attempts say how long the queue took.
        if job.attempt == 1 and isinstance(job.created_at, int) and isinstance(job.started_at, int):
            self._pickup.labels(str(job.node_id)).observe(max(0, job.started_at - job.created_at) / 1000)

    def job_finished(self, node: str, tool: str, status: str, duration_ms: int | None) -> None:
        tool = tool if tool in TOOLS else "invalid"  # a bad row's tool is any text: never a label of its own
        self._finished.labels(node, tool, status).inc()
        if isinstance(duration_ms, int):
            self._duration.labels(node, tool).observe(max(0, duration_ms) / 1000)

    def db_write_error(self) -> None:
        self._db_errors.inc()

    def ssh_reconnected(self, node: str) -> None:
        self._reconnects.labels(node).inc()

    def job_killed_outside(self, node: str) -> None:
        self._killed_outside.labels(node).inc()

    # -- running --------------------------------------------------------------------------------------------

    async def run(self, store: Store, health: Health, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED) -> None:
        """Answer GET /metrics (from `task_status.started()` on) and rewrite the textfile every TEXTFILE_INTERVAL_S,
        until cancelled; the textfile is written once more on the way out (after the last jobs were recorded)."""
        self._store, self._health = store, health
        if self._server is not None:
            self._accept_errors.install(asyncio.get_running_loop())
            await self._server.start_serving()
            logger.info("metrics.serving", listen=self._address(), url=f"http://{self._address()}/metrics")
        task_status.started()
        try:
            if self._textfile is None:
                await anyio.sleep_forever()
            while True:
                await self._write_textfile()
                await ticks.sleep_until_next(TEXTFILE_INTERVAL_S)
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()
                if self._textfile is not None:
                    await self._write_textfile()

    async def aclose(self) -> None:
        """Stop listening and end the requests still being answered."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._requests):
            task.cancel()
        if self._requests:
            await asyncio.gather(*self._requests, return_exceptions=True)

    # -- the gauges, read when someone looks ------------------------------------------------------------------

    async def _sample(self) -> None:
        """Read the queue (one grouped count on the claim index) and the nodes' state into the gauges: only when
        a scrape or the textfile asks, never on a timer of its own; scrapes at once take turns."""
        async with self._sampling:
            if self._store is None or self._health is None:
                return
            queue, ages = None, {}
            if self._store.unwritable is None:  # a file another program rewrote is not read any more
                try:
                    async with asyncio.timeout(DB_READ_TIMEOUT_S):
                        queue = await self._store.queue_by_node()
                        ages = await self._store.heartbeat_ages()
                except _UNREADABLE as e:
                    logger.warning("metrics.db_unavailable", error=str(e) or type(e).__name__,
                                   reason="the queue gauges are left out of this scrape")
            nodes = self._health.nodes
            self._gauges.sample = _Sample(queue, {n: s.status == "online" for n, s in nodes.items()},
                                          {n: ms for n, ms in ages.items() if n in nodes})

    # -- the textfile -------------------------------------------------------------------------------------------

    def _check_textfile_dir(self) -> None:
        if self._textfile is None:
            return
        directory = self._textfile.parent
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            problem = "does not exist" if not directory.is_dir() else "is not writable by this user"
            raise ConfigError(f"{self._settings_file}: [metrics] textfile = '{self._textfile}': the directory "
                              f"{directory} {problem}; create it (node_exporter's --collector.textfile.directory) "
                              "or choose a directory this daemon's user can write")

    async def _write_textfile(self) -> None:
        """The whole registry to PATH.tmp, then renamed over PATH: node_exporter never reads half a file."""
        assert self._textfile is not None
        await self._sample()
        try:
            await anyio.to_thread.run_sync(_write_atomically, self._textfile, self.registry)
        except OSError as e:
            if self._textfile_error != str(e):
                logger.warning("metrics.textfile_failed", path=str(self._textfile), error=str(e))
            self._textfile_error = str(e)
        else:
            if self._textfile_error is not None:
                logger.info("metrics.textfile_written", path=str(self._textfile))
            self._textfile_error = None

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def _address(self) -> str:
        assert self._listen is not None
        host, port = self._listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _bind(self) -> None:
        """Listen now, answer once `run` starts: start-up fails here, with what to do, if the port is taken."""
        if self._listen is None:
            return
        host, port = self._listen
        try:
            self._server = await asyncio.start_server(self._answer, host, port, limit=MAX_REQUEST_HEAD,
                                                      start_serving=False)
        except OSError as e:
            raise ConfigError(f"{self._settings_file}: [metrics] listen = '{self._address()}': "
                              f"{_bind_problem(e, host, port)}") from e

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection: GET (or HEAD) /metrics; anything else gets its 4xx. Past MAX_CONNECTIONS
        at once, a connection is closed unanswered (its descriptor back at once): Prometheus tries again."""
        if len(self._requests) >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._requests.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with asyncio.timeout(HEADER_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
                status, headers, body = await self._response(head)
                writer.write(f"HTTP/1.1 {status}\r\n".encode() + b"".join(
                    f"{name}: {value}\r\n".encode("latin-1") for name, value in headers) + b"Connection: close\r\n\r\n")
                writer.write(body)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, or sent nothing we can answer: close
        except Exception:  # a bug: this request fails, the daemon and its jobs go on
            logger.exception("metrics.request_failed")
        finally:
            self._requests.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _response(self, head: bytes) -> tuple[str, list[tuple[str, str]], bytes]:
        from prometheus_client.exposition import choose_encoder

        request_line, _, header_lines = head.decode("latin-1").partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _text("400 Bad Request", "not an HTTP request\n")
        method, target, _ = parts
        if target.partition("?")[0] != "/metrics":
            return _text("404 Not Found", "nexus-jobd serves its metrics at /metrics\n")
        if method not in ("GET", "HEAD"):
            status, headers, body = _text("405 Method Not Allowed", "GET /metrics\n")
            return status, [*headers, ("Allow", "GET, HEAD")], body
        accept = ""
        for line in header_lines.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        await self._sample()
        encoder, content_type = choose_encoder(accept)  # Prometheus may ask for OpenMetrics
        body = encoder(self.registry)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        return "200 OK", headers, b"" if method == "HEAD" else body


class _AcceptErrors:
    """asyncio reports a failing accept (EMFILE: out of descriptors) to the loop's exception handler up to a
    hundred times a tick, each with a traceback: this logs it once per ACCEPT_ERROR_LOG_S, with the count, and
    passes every other report on."""

    MESSAGE = "socket.accept() out of system resource"

    def __init__(self) -> None:
        self._failed = 0
        self._logged_at = -ACCEPT_ERROR_LOG_S

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        previous = loop.get_exception_handler()

        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
            if context.get("message") != self.MESSAGE:
                if previous is not None:
                    previous(loop, context)
                else:
                    loop.default_exception_handler(context)
                return
            self._failed += 1
            now = loop.time()
            if now - self._logged_at >= ACCEPT_ERROR_LOG_S:
                logger.error("metrics.accept_failed", error=str(context.get("exception")), failed=self._failed,
                             reason="the daemon is out of file descriptors; /metrics answers again once some "
                                    "are free (raise LimitNOFILE / ulimit -n)")
                self._logged_at, self._failed = now, 0

        loop.set_exception_handler(handle)


def _text(status: str, text: str) -> tuple[str, list[tuple[str, str]], bytes]:
    body = text.encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))], body


def _bind_problem(error: OSError, host: str, port: int) -> str:
    if error.errno == errno.EADDRINUSE:
        return (f"port {port} is already in use on {host}; stop the program listening there (`ss -ltnp "
                f"'sport = :{port}'` names it) or choose another port")
    if error.errno == errno.EACCES:
        return f"this user may not listen on port {port} (ports below 1024 need privileges); choose 1024 or above"
    if error.errno == errno.EADDRNOTAVAIL or error.errno is None or error.errno < 0:  # getaddrinfo errors are < 0
        return (f"{host!r} is not an address of this host ({error.strerror or error}); use 127.0.0.1 (this host "
                "only), 0.0.0.0 (every interface) or one of this host's addresses")
    return f"cannot listen there: {error.strerror or error}; choose another address or port"


def _write_atomically(path: Path, registry: CollectorRegistry) -> None:
    """A new file of a random name (created exclusively, never through a link another user planted) in the same
    directory, renamed over PATH: the rename is atomic, and a name not ending in .prom is never read."""
    from prometheus_client import generate_latest

    data = generate_latest(registry)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # O_EXCL | O_NOFOLLOW
    try:
        with open(fd, "wb") as f:
            os.fchmod(f.fileno(), TEXTFILE_MODE)  # whatever the umask
            f.write(data)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
