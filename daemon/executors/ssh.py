"""Run a Command on a node reached over SSH: one pooled connection per node, one channel per job.

The remote command records its process group (sshd makes each session's shell a session leader, so its pid is
the group id) in a file, and cancel/timeout kill that whole group over a second channel: SSH signal requests are
ignored by older OpenSSH and would reach only the shell. Imported only when an SSH node is configured: asyncssh
costs about 18 MB.
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
import signal
import time
from typing import Any

import asyncssh

from daemon import logging as log
from daemon.config import NodeConfig, SshTarget
from daemon.executors.base import ConnectionLost, ExitStatus, OutputCallback, SpawnError
from daemon.metrics import Hooks
from daemon.tools import Command

logger = log.get("ssh")
PID_DIR = "$HOME/.cache/nexus-jobd"
BACKOFF_MAX_S = 30.0


class HostKeyError(SpawnError):
    """The node's host key is unknown or changed: the node is refused until its known_hosts entry is right."""


def pid_file_for(key: str) -> str:
    """The remote pid file of one attempt: found again from the row alone, by whichever daemon recovers it."""
    return hashlib.sha256(key.encode()).hexdigest()[:24]


# What the pid file holds besides the group id, so that a kill never hits a stranger that got the id later: the
# leader's start time (field 22 of /proc/PID/stat; the login shell's name has no spaces) and the node's boot id.
# On a node without /proc both are written and compared as "-", and the check passes as before.
_STARTED = "$(cut -d' ' -f22 /proc/{pid}/stat 2>/dev/null)"
_BOOT_ID = "$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)"


def kill_script(pid_file: str, signum: int, *, remove: bool = False) -> str:
    """Signal the recorded group: only in the same boot, and only if its leader is gone (the group id stays
    reserved while members live) or is still the same process. `kill -N -PGID`: dash refuses `kill -N -- -PGID`."""
    same_leader = f'{{ [ ! -e "/proc/$p" ] || {{ t={_STARTED.format(pid="$p")}; [ "$s" = "${{t:--}}" ]; }}; }}'
    script = (f'f="{PID_DIR}/{pid_file}"; if [ -s "$f" ]; then read -r p s b < "$f"; c={_BOOT_ID}; '
              f'[ "$b" = "${{c:--}}" ] && {same_leader} && kill -{int(signum)} -"$p" 2>/dev/null; fi; ')
    return script + ('rm -f "$f"; true' if remove else "true")


def _env_argv(command: Command, argv: tuple[str, ...]) -> list[str]:
    """`env` setting and unsetting the command's variables, then argv: quoted, it passes any shell untouched."""
    unset = [arg for name, value in command.env.items() if value is None for arg in ("-u", name)]
    assign = [f"{name}={value}" for name, value in command.env.items() if value is not None]
    return ["env", *unset, *assign, *argv]  # env takes its options before the assignments


def remote_script(command: Command, pid_file: str) -> str:
    """One POSIX sh command line: record the group, go to the directory, set the environment, run argv, clean up.

    Everything from the row is quoted, so the remote shell passes it through untouched.
    """
    run = shlex.join(_env_argv(command, command.exec_argv))
    cd = f"cd {shlex.quote(command.cwd)} || exit 127; " if command.cwd else ""
    record = (f's={_STARTED.format(pid="$$")}; b={_BOOT_ID}; echo "$$ ${{s:--}} ${{b:--}}" > '
              f'"{PID_DIR}/{pid_file}"')
    return (f'mkdir -p "{PID_DIR}" && {record}; {cd}{run} </dev/null; rc=$?; '
            f'rm -f "{PID_DIR}/{pid_file}"; exit $rc')


def _signal_number(name: str | None) -> int:
    try:
        return int(signal.Signals[f"SIG{name}"]) if name else 0
    except KeyError:
        return 0


class _Session(asyncssh.SSHClientSession[bytes]):
    def __init__(self, on_stdout: OutputCallback, on_stderr: OutputCallback) -> None:
        self._on_stdout, self._on_stderr = on_stdout, on_stderr
        self.exit_status: int | None = None
        self.exit_signal: int | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        (self._on_stderr if datatype == asyncssh.EXTENDED_DATA_STDERR else self._on_stdout)(data)

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = _signal_number(signal)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)


class SshProcess:
    def __init__(self, executor: SshExecutor, conn: asyncssh.SSHClientConnection, session: _Session,
                 pid_file: str) -> None:
        self._executor, self._conn, self._session, self._pid_file = executor, conn, session, pid_file
        self._node = executor.node
        self._tasks: set[asyncio.Task[None]] = set()

    pid = None  # not a pid of this host: crash recovery cannot kill it from here

    @property
    def exited(self) -> bool:
        return self._session.closed.done()

    async def wait(self) -> ExitStatus:
        try:
            await asyncio.shield(self._session.closed)
        finally:
            self._executor.channels.release()
        status, sig = self._session.exit_status, self._session.exit_signal
        if sig:
            return ExitStatus(128 + sig, sig)
        if status is None:  # asyncssh reports a dropped connection as no exit status at all
            self._executor.kill_when_back(self._pid_file)  # the job may still run over there
            raise ConnectionLost(f"connection to node {self._node} lost while the job ran")
        return ExitStatus(status)

    def signal_group(self, signum: int) -> None:
        """Kill the job's process group on the node, over a channel of its own."""
        task = asyncio.get_running_loop().create_task(self._run_quietly(kill_script(self._pid_file, signum)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_quietly(self, script: str) -> None:
        try:
            await self._executor.run(script, 15)
        except (OSError, asyncssh.Error, SpawnError, TimeoutError) as e:
            logger.warning("ssh.signal_failed", node=self._node, error=str(e) or type(e).__name__)


class SshExecutor:
    """The pooled connection to one node, opened on first use, reopened with back-off after a failure."""

    def __init__(self, node: NodeConfig, metrics: Hooks | None = None) -> None:
        assert node.ssh is not None
        self.node, self._target = node.id, node.ssh
        self._metrics = metrics or Hooks()
        self._connected_before = False  # each connection after the first is a reconnect (metrics)
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
                raise SpawnError(f"node {self.node} is unreachable ({self._last_error}); "
                                 f"next try in {self._retry_at - time.monotonic():.0f}s")
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
                raise SpawnError(f"cannot connect to node {self.node} as {t.user}@{t.host}:{t.port}: "
                                 f"{self._last_error}") from e
            self._failures = 0
            logger.info("ssh.connected", node=self.node, host=self._target.host, port=self._target.port)
            if self._connected_before:
                self._metrics.ssh_reconnected(self.node)
            self._connected_before = True
            return self._conn

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback) -> SshProcess:
        conn = await self.connection()
        pid_file = pid_file_for(command.key or repr((command.argv, time.time_ns())))
        await self.channels.acquire()
        try:
            channel, session = await conn.create_session(
                lambda: _Session(on_stdout, on_stderr), remote_script(command, pid_file), encoding=None)
        except (OSError, asyncssh.Error) as e:
            self.channels.release()
            raise SpawnError(f"cannot start the job on node {self.node}: {e}") from e
        channel.write_eof()  # stdin: nothing
        assert isinstance(session, _Session)
        return SshProcess(self, conn, session, pid_file)

    def kill_when_back(self, pid_file: str) -> None:
        """A job whose connection dropped may run on: kill its group as soon as the node answers again."""
        task = asyncio.get_running_loop().create_task(self._kill_when_back(pid_file))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _kill_when_back(self, pid_file: str) -> None:
        delay = 1.0
        for _ in range(40):  # about half an hour of trying
            try:
                await self.run(kill_script(pid_file, signal.SIGKILL, remove=True), 15)
            except (OSError, asyncssh.Error, SpawnError, TimeoutError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)
            else:
                logger.info("ssh.orphan_killed", node=self.node, pid_file=pid_file)
                return

    async def kill_orphan(self, key: str) -> None:
        """A dead daemon's job on this node: kill its process group (it records it at start), if it still runs."""
        await self.run(kill_script(pid_file_for(key), signal.SIGKILL, remove=True), timeout_s=15)

    async def run(self, script: str, timeout_s: float) -> asyncssh.SSHCompletedProcess:
        """A short shell line of the daemon's own (a probe, a kill) on the control channel; `timeout_s` covers the
        wait for the channel too."""
        return await asyncio.wait_for(self._run_on(self._control, script), timeout_s)

    async def _run_on(self, channel: asyncio.Semaphore, script: str) -> asyncssh.SSHCompletedProcess:
        conn = await self.connection()
        async with channel:
            return await conn.run(script, check=False, encoding="utf-8", errors="replace")

    async def output(self, command: Command, timeout_s: float) -> str:
        try:
            result = await asyncio.wait_for(self._run_on(self._commands, shlex.join(_env_argv(command, command.argv))),
                                            timeout_s)
        except (OSError, asyncssh.Error, SpawnError, TimeoutError) as e:
            logger.warning("ssh.command_failed", node=self.node, argv=list(command.argv),
                           error=str(e) or type(e).__name__)
            return ""
        return str(result.stdout or "")

    async def aclose(self) -> None:
        for task in list(self._cleanups):
            task.cancel()
        if self._conn is not None:
            self._conn.close()
            await self._conn.wait_closed()
