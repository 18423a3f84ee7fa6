"""Run a Command on a node reached over SSH: one pooled connection per node; each job detached on the node.

A job runs in the background of its own directory on the node (daemon.executors.spool), its output going to
spool files there, not to the channel that started it. A reader channel per job sends what the spools gained since
the byte offsets the daemon asks from, so a dropped link, or a daemon that stopped, loses nothing: the job stays
`executing`, and reading goes on from the same offsets when the node answers again (or another daemon adopts it).
Cancel/timeout kill the recorded process group over a second channel: SSH signal requests are ignored by older
OpenSSH and would reach only the shell. Imported only when an SSH node is configured: asyncssh costs about 18 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

with warnings.catch_warnings():
    # cryptography deprecates DSA, which asyncssh still offers (and the daemon never asks for): ten lines of
    # CryptographyDeprecationWarning at every start would say nothing a user can act on.
    warnings.filterwarnings("ignore", message="DSA is deprecated")
    import asyncssh

from daemon import logging as log
from daemon.config import NodeConfig, SshTarget
from daemon.errors import ConnectionLost, JobLost, NodeUnreachable, SpawnError
from daemon.executors import spool
from daemon.executors.base import HELPER_OUTPUT_MAX, OutputCallback, OutputTooLong, UntrustedNode
from daemon.hooks import Hooks
from daemon.model import Command, ExitStatus
from daemon.output import JobOutput, StreamCapture

logger = log.get("ssh")
BACKOFF_MAX_S = 30.0
POLL_MIN_S = 0.01  # the looks at a running job's spools start this often and double up to poll_max_s
BUSY_BYTES = 64 * 1024  # a reply this big: ask again at once, so a fast writer's spool does not pile up
REPLY_TIMEOUT_S = 120.0  # a reader that answers nothing for this long is taken for a lost link
RECONNECT_STEP_S = 0.5
REMOVE_AFTER_S = 2.0  # directories of final rows go with the next start on the node, or after this long
REMOVE_BATCH = 64
CLOSE_WAIT_S = 5.0  # how long a helper command's channel may take to close


def in_sh(script: str) -> str:
    """Every script of ours runs in the node's `sh`, whatever the login shell (zsh does not split words, fish is
    not POSIX): `exec` keeps the login shell's pid, which sshd made a session and process-group leader."""
    return f"exec sh -c {shlex.quote(script)}"


class HostKeyError(UntrustedNode):
    """The node's host key is unknown or changed: the node is refused until its known_hosts entry is right."""


class _ReaderSession(asyncssh.SSHClientSession[bytes]):
    """One reader channel: its stdout carries frames; anything on its stderr (the job's wrapper writes a newline
    there when the job ends; it is not the job's stderr) is a poke: look now."""

    def __init__(self, parser: spool.FrameParser, replies: asyncio.Queue[spool.Reply | None],
                 poke: asyncio.Event) -> None:
        self._parser, self._replies, self._poke = parser, replies, poke
        self.empty_end: int | None = None  # the wrapper said: ended with this status, spools empty
        self._broken = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            if self.empty_end is None and len(data) < 16:
                self.empty_end = spool.empty_end(data)
            self._poke.set()
            return
        if self._broken:
            return
        try:
            self._parser.feed(data)
        except spool.ProtocolError as e:
            self._broken = True
            self._replies.put_nowait(spool.Reply("error", f"the job's reader sent {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._replies.put_nowait(None)
        if not self.closed.done():
            self.closed.set_result(None)


class SshProcess:
    """A job detached on its node, followed by a reader channel that is reopened whenever it drops."""

    pid = None  # not a pid of this host: crash recovery finds it by its directory instead
    detachable = True

    def __init__(self, executor: SshExecutor, key: str, output: JobOutput, on_stdout: OutputCallback,
                 on_stderr: OutputCallback) -> None:
        self._executor, self._node = executor, executor.node
        self._name, self._job_id = spool.dir_name(key), key.rpartition(":")[0]
        self._output = output
        self._streams: dict[int, tuple[StreamCapture, OutputCallback]] = {
            1: (output.stdout, on_stdout), 2: (output.stderr, on_stderr)}
        self._channel: asyncssh.SSHClientChannel[bytes] | None = None
        self._session: _ReaderSession | None = None
        self._parser: spool.FrameParser | None = None
        self._replies: asyncio.Queue[spool.Reply | None] = asyncio.Queue()
        self._signal = 0  # the strongest signal asked for and not yet delivered (KILL > TERM)
        self._killed = False  # a KILL was asked for: a job gone without status was killed by us
        self._reached = asyncio.Event()  # the node answered once: the pid file a kill reads exists
        self._wake = asyncio.Event()  # a poke from the node, or the next look is due
        self._done = False
        self._lost_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def exited(self) -> bool:
        return self._done


    # -- the reader channel ---------------------------------------------------------------------------------

    async def open(self, script: str, *, ask: bool = True, preamble: bytes = b"") -> None:
        """Open a reader channel running `script`, `preamble` its first input (a start's variables); the first
        request rides with it unless not `ask`."""
        conn = await self._executor.connection()
        await self._executor.channels.acquire()
        replies: asyncio.Queue[spool.Reply | None] = asyncio.Queue()
        parser = spool.FrameParser(self._on_data, self._on_skip, replies.put_nowait,
                                   max_piece=self._output.stdout.cap + 1)
        try:
            channel, session = await conn.create_session(lambda: _ReaderSession(parser, replies, self._wake),
                                                         in_sh(script), encoding=None)
        except asyncssh.ChannelOpenError as e:
            self._executor.channels.release()
            if not conn.is_closed():  # the node said no (MaxSessions...): asking again is no better
                raise SpawnError(f"cannot open a channel to node {self._node}: {e}") from e
            # The connection closed under the open (the node died as the job was placed on it): nothing started.
            raise NodeUnreachable(f"cannot open a channel to node {self._node}: {e}", RECONNECT_STEP_S) from e
        except (OSError, asyncssh.Error) as e:  # the link broke (a network change): nothing started there
            self._executor.channels.release()
            raise NodeUnreachable(f"cannot open a channel to node {self._node}: {e or type(e).__name__}",
                                  RECONNECT_STEP_S) from e
        assert isinstance(session, _ReaderSession)
        session.closed.add_done_callback(lambda _: self._executor.channels.release())
        self._channel, self._replies, self._session, self._parser = channel, replies, session, parser
        if preamble:
            channel.write(preamble)
        if ask:
            self._request()

    def _on_data(self, stream: int, data: bytes) -> None:
        self._streams[stream][1](data)

    def _on_skip(self, stream: int, n: int) -> None:
        capture, notify = self._streams[stream]
        if not capture.head_kept:
            raise spool.ProtocolError(f"a skip of {n} bytes of a stream whose head is not complete")
        if capture.total + n >= spool.MAX_SPOOL_BYTES:
            raise spool.ProtocolError(f"a skip to byte {capture.total + n} of {capture.name}, past what a spool "
                                      "can hold")
        capture.skip(n)
        notify(b"")

    def _request(self) -> None:
        if self._parser is not None:
            self._parser.expect()
        self._write(f"{self._output.stdout.total} {self._output.stderr.total}\n")

    def _write(self, line: str) -> bool:
        if self._channel is None:
            return False
        try:
            self._channel.write(line.encode())
        except (OSError, asyncssh.Error):
            return False  # closing: its session puts the end in the queue
        return True

    def _close(self) -> None:
        """The reader ends at the end of its input; the job and its directory stay. One close, not an EOF and a
        close: a packet is most of what a short job costs this daemon."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # -- following the job ----------------------------------------------------------------------------------

    async def wait(self) -> ExitStatus:
        try:
            return await self._follow()
        finally:
            self._close()  # the reader ends at the end of its input; the directory stays until the row is final
            self._done = True

    async def _follow(self) -> ExitStatus:
        delay = POLL_MIN_S
        if self._channel is not None:  # just started: the first look when it ends (a poke), or when due
            await self._pause(self._executor.poll_max_s)
            if (status := self._ended_empty()) is not None:
                return status
            self._request()
        while True:
            reply = await self._next_reply() if self._channel is not None else None
            if reply is None:  # the reader ended without a status: the link dropped (or never was)
                if self._channel is not None and not self._killed:  # our KILL takes the start channel's shell too
                    self._lost("the job's reader channel closed (connection lost or the node's sshd gone)")
                await self._reopen()
                delay = POLL_MIN_S
                continue
            self._reached.set()
            self._back()
            if reply.kind != "run":
                return self._ended(reply)
            # Catching up under the cap: ask again at once. A reply that skipped to the tail: the job writes faster
            # than any reader (the node's trimmer keeps its spool small): a new tail once per poll interval is all
            # the row can show.
            if reply.skipped:
                delay = self._executor.poll_max_s
            if reply.data_bytes < BUSY_BYTES or reply.skipped:
                delay = min(delay * 2, self._executor.poll_max_s)
                await self._pause(delay)
            self._request()

    def _ended_empty(self) -> ExitStatus | None:
        """The wrapper said the job ended with empty spools, and nothing was read: the status is all there is
        (the fast path of short quiet jobs: no request at all)."""
        code = self._session.empty_end if self._session is not None else None
        if code is None or self._output.stdout.total or self._output.stderr.total:
            return None
        self._reached.set()
        return ExitStatus(code)

    async def _pause(self, delay: float) -> None:
        """Until the next look is due, or the node pokes (the job ended)."""
        handle = asyncio.get_running_loop().call_later(delay, self._wake.set)
        try:
            await self._wake.wait()
        finally:
            handle.cancel()
            self._wake.clear()

    async def _next_reply(self) -> spool.Reply | None:
        if not self._replies.empty():
            return self._replies.get_nowait()
        # A timer handle rather than wait_for, which costs a task per reply (several per job on the fast path).
        handle = asyncio.get_running_loop().call_later(REPLY_TIMEOUT_S, self._replies.put_nowait, None)
        try:
            return await self._replies.get()
        finally:
            handle.cancel()

    def _ended(self, reply: spool.Reply) -> ExitStatus:
        if reply.kind == "rc":
            code = spool.parse_status(reply.value)
            if code is None:
                self._give_up()
                raise JobLost(f"the job's status file on node {self._node} holds {reply.value[:40]!r}, not an "
                              "exit status")
            return ExitStatus(code)
        if reply.kind == "gone" and self._killed:
            return ExitStatus(128 + signal.SIGKILL, signal.SIGKILL)
        if reply.kind == "gone":
            raise JobLost(f"the job's processes on node {self._node} are gone without an exit status (killed with "
                          "SIGKILL by someone else, or the node rebooted)")
        self._give_up()
        raise JobLost(f"node {self._node}: {reply.value}")

    def _give_up(self) -> None:
        """What the node says cannot be trusted: whatever may still run of the job dies, and its directory goes
        (the row fails with the reason)."""
        self._executor.kill_when_back(self._name)

    async def _reopen(self) -> None:
        """Reconnect (the executor backs off) and read on from the offsets; after reattach_timeout_ms without the
        node, the job is lost: its group is killed when the node answers again."""
        self._close()
        while True:
            if self._lost_at is not None:
                left = self._lost_at + self._executor.reattach_timeout_s - time.monotonic()
                if left <= 0:
                    self._executor.kill_when_back(self._name)
                    raise ConnectionLost(f"connection to node {self._node} lost while the job ran, and not back "
                                         f"within reattach_timeout_ms ({self._executor.reattach_timeout_s * 1000:g})")
            try:
                await self.open(spool.reader_script(self._name, self._output.stdout.cap))
                return
            except SpawnError as e:
                self._lost(str(e))
                await asyncio.sleep(RECONNECT_STEP_S)

    def _lost(self, error: str) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
            logger.warning("ssh.link_lost", node=self._node, job_id=self._job_id, error=error,
                           reattach_timeout_s=self._executor.reattach_timeout_s)

    def _back(self) -> None:
        if self._lost_at is None:
            return
        logger.info("ssh.link_back", node=self._node, job_id=self._job_id,
                    down_s=round(time.monotonic() - self._lost_at, 1))
        self._lost_at = None
        if self._signal:  # asked for while the node could not be reached
            self._spawn(self._deliver())

    # -- signals and the end --------------------------------------------------------------------------------

    def signal_group(self, signum: int) -> None:
        """Kill the job's process group on the node, over a channel of its own; if the node cannot be reached,
        again once it can."""
        if signum == signal.SIGKILL:
            self._killed = True
        if self._signal != signal.SIGKILL:
            self._signal = signum
        self._spawn(self._deliver())

    async def _deliver(self) -> None:
        await self._reached.wait()
        signum = self._signal
        if not signum:
            return
        try:
            await self._executor.run(spool.kill_script(self._name, signum), 15)
        except (OSError, asyncssh.Error, SpawnError, TimeoutError) as e:
            logger.warning("ssh.signal_failed", node=self._node, job_id=self._job_id, signal=signum,
                           error=str(e) or type(e).__name__, retry="when the node answers again")
            return
        if self._signal == signum:
            self._signal = 0

    def forget(self, *, remove: bool) -> None:
        """The row is final: its directory is removed with the next start on the node (or soon by itself)."""
        self._close()
        if remove:
            self._executor.remove_later(self._name)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class SshExecutor:
    """The pooled connection to one node, opened on first use, reopened with back-off after a failure."""

    can_reattach = True

    def __init__(self, node: NodeConfig, metrics: Hooks | None = None, *, poll_max_s: float = 0.125) -> None:
        assert node.ssh is not None
        self.node, self._target = node.id, node.ssh
        self._metrics = metrics or Hooks()
        self._connected_before = False  # each connection after the first is a reconnect (metrics)
        self.poll_max_s = poll_max_s  # a running job's spools are looked at least this often (flush_interval/2)
        self.reattach_timeout_s = node.ssh.reattach_timeout_ms / 1000
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        # Two channels stay out of the jobs' reach: one for kills and probes (short), one for the daemon's docker
        # commands (`docker stop` may take the grace period), so neither waits behind the other. Past MaxSessions
        # a request would fail; here it queues, within its timeout.
        self.channels = asyncio.Semaphore(max(1, self._target.max_sessions - 2))
        self._control, self._commands = asyncio.Semaphore(1), asyncio.Semaphore(1)
        self._cleanups: set[asyncio.Task[None]] = set()
        self._to_remove: list[str] = []  # directories of final rows, not yet removed
        self._remover: asyncio.Task[None] | None = None

    def _options(self) -> dict[str, Any]:
        t: SshTarget = self._target
        return {"host": t.host, "port": t.port, "username": t.user,
                "known_hosts": str(t.known_hosts) if t.known_hosts else None,
                "client_keys": [str(t.key)] if t.key else (),
                "agent_path": None if t.key else (),
                "keepalive_interval": t.keepalive_interval_s, "keepalive_count_max": t.keepalive_count_max,
                "connect_timeout": t.connect_timeout_s, "agent_forwarding": False}

    async def connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            if time.monotonic() < self._retry_at:
                raise NodeUnreachable(f"node {self.node} is unreachable ({self._last_error}); next try in "
                                      f"{self._retry_at - time.monotonic():.0f}s", self._retry_at - time.monotonic())
            options = {k: v for k, v in self._options().items() if v != ()}
            try:
                self._conn = await asyncssh.connect(**options)
            except asyncssh.HostKeyNotVerifiable as e:
                raise HostKeyError(f"host key of node {self.node} ({self._target.host}) not verified: {e}; fix its "
                                   f"entry in {self._target.known_hosts}") from e
            except (OSError, asyncssh.Error, TimeoutError) as e:
                self._failures += 1
                self._last_error = str(e) or type(e).__name__
                self._retry_at = time.monotonic() + min(BACKOFF_MAX_S, 0.5 * 2 ** self._failures)
                t = self._target
                raise NodeUnreachable(f"cannot connect to node {self.node} as {t.user}@{t.host}:{t.port}: "
                                      f"{self._last_error}", self._retry_at - time.monotonic()) from e
            self._failures = 0
            logger.info("ssh.connected", node=self.node, host=self._target.host, port=self._target.port)
            if self._connected_before:
                self._metrics.ssh_reconnected(self.node)
            self._connected_before = True
            return self._conn

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput) -> SshProcess:
        key = command.key or repr((command.argv, time.time_ns()))
        process = SshProcess(self, key, output, on_stdout, on_stderr)
        removals = self._removals()
        script = spool.start_script(command, spool.dir_name(key), output.stdout.cap)
        try:
            await process.open(f"{spool.remove_script(*removals)}; {script}" if removals else script, ask=False,
                               preamble=spool.env_message(command.env))
        except NodeUnreachable:
            self._to_remove += removals
            raise
        except SpawnError as e:
            self._to_remove += removals
            raise SpawnError(f"cannot start the job on node {self.node}: {e}") from e
        return process

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> SshProcess:
        """Follow a job started earlier; the reader channel opens in `wait` (and waits for the node there)."""
        return SshProcess(self, key, output, on_stdout, on_stderr)

    async def ready(self) -> None:
        pass  # connected on first use

    async def holds(self, keys: list[str]) -> set[str]:
        """Every one, as far as this daemon can tell without a round trip: following one again says (its spool
        is on the node, or "gone")."""
        return set(keys)

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        return []  # the sweep, a while after start-up, does it for a node's spools

    def kill_when_back(self, name: str) -> None:
        """A job given up on (its node stayed unreachable) may run on: kill its group as soon as the node answers
        again, and remove its directory."""
        task = asyncio.get_running_loop().create_task(self._kill_when_back(name))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _kill_when_back(self, name: str) -> None:
        delay = 1.0
        for _ in range(40):  # about half an hour of trying
            try:
                await self.run(spool.kill_script(name, signal.SIGKILL, remove=True), 15)
            except (OSError, asyncssh.Error, SpawnError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
            else:
                logger.info("ssh.orphan_killed", node=self.node, dir=name)
                return

    def remove_later(self, name: str) -> None:
        """An attempt's row is final: its directory goes with the next start on this node (no round trip of its
        own), or after REMOVE_AFTER_S over the control channel. A daemon that dies first leaves it to the sweep."""
        self._to_remove.append(name)
        if self._remover is None or self._remover.done():
            self._remover = asyncio.get_running_loop().create_task(self._remove_soon())

    def _removals(self) -> list[str]:
        names, self._to_remove = self._to_remove[:REMOVE_BATCH], self._to_remove[REMOVE_BATCH:]
        return names

    async def _remove_soon(self) -> None:
        while self._to_remove:
            await asyncio.sleep(REMOVE_AFTER_S)
            names = self._removals()
            if not names:
                continue
            try:
                await self.run(spool.remove_script(*names), 15)
            except (OSError, asyncssh.Error, SpawnError, TimeoutError) as e:
                logger.warning("ssh.spool_not_removed", node=self.node, dirs=names, error=str(e) or type(e).__name__)

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        """Kill and remove what this database's finished attempts left on the node (their daemon could not remove
        it). Only those: another installation logging in as the same user keeps its jobs in the same directory,
        and what is not ours to know stays (a pruned row's leftover too)."""
        try:
            listing = await self.run(f'cd "{spool.JOBS_DIR}" 2>/dev/null && ls', 15)
        except OutputTooLong as e:  # tens of thousands of directories: these now, the rest at the next sweep
            listing = e.complete_lines
        names = [n for n in listing.split() if len(n) == 24 and n.isalnum()]
        if not names:
            return
        ours = {spool.dir_name(f"{job_id}:{attempt}") for job_id, attempt in await finished_attempts()}
        for name in names:
            if name in ours:
                await self.run(spool.kill_script(name, signal.SIGKILL, remove=True), 15)
                logger.info("ssh.spool_swept", node=self.node, dir=name)

    async def run(self, script: str, timeout_s: float, *, limit: int = HELPER_OUTPUT_MAX) -> str:
        """A short shell line of the daemon's own (a probe, a kill) on the control channel: its stdout, at most
        `limit` bytes (more raises OutputTooLong). `timeout_s` covers the wait for the channel too."""
        return await asyncio.wait_for(self._run_on(self._control, script, limit), timeout_s)

    async def _run_on(self, channel: asyncio.Semaphore, script: str, limit: int, stdin: bytes = b"") -> str:
        """Read no more than `limit` + 1 bytes of stdout, then close: a node that prints without end costs that
        much memory, not all it sends. Its stderr is dropped as it comes."""
        conn = await self.connection()
        async with channel:
            process = await conn.create_process(in_sh(script), encoding=None, stderr=asyncssh.DEVNULL)
            try:
                process.stdin.write(stdin)
                process.stdin.write_eof()
                data = bytearray()
                while len(data) <= limit and (chunk := await process.stdout.read(limit + 1 - len(data))):
                    data += chunk
            finally:
                process.close()  # the channel counts against MaxSessions until closed on both sides
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_WAIT_S):  # not for ever: wait_for waits for this too
                        await process.wait_closed()
        text = bytes(data[:limit]).decode("utf-8", "replace")
        if len(data) > limit:
            raise OutputTooLong(f"node {self.node} printed more than {limit} bytes for a command of the daemon's own "
                                "(a node answering with something else than the command's output?)", text)
        return text

    async def output(self, command: Command, timeout_s: float) -> str:
        """argv with the command's variables (sent over stdin: spool.env_message), its stdout (cut at
        HELPER_OUTPUT_MAX, at a line's end)."""
        script = spool.READ_ENV + spool.with_env(command.argv)
        try:
            return await asyncio.wait_for(self._run_on(self._commands, script, HELPER_OUTPUT_MAX,
                                                       spool.env_message(command.env)), timeout_s)
        except OutputTooLong as e:
            logger.warning("ssh.command_output_cut", node=self.node, argv=list(command.argv), error=str(e))
            return e.complete_lines
        except (OSError, asyncssh.Error, SpawnError, TimeoutError) as e:
            logger.warning("ssh.command_failed", node=self.node, argv=list(command.argv),
                           error=str(e) or type(e).__name__)
            return ""

    async def aclose(self) -> None:
        if self._to_remove:  # a last batch, briefly: what is left the next daemon sweeps
            with contextlib.suppress(OSError, asyncssh.Error, SpawnError, TimeoutError):
                await self.run(spool.remove_script(*self._removals()), 5)
        for task in [*self._cleanups, *([self._remover] if self._remover else [])]:
            task.cancel()
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
