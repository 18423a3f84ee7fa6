"""Run a Command on this machine: its own session and process group (so no controlling terminal: nothing can
stop to prompt on /dev/tty), stdin from /dev/null.

By default the host's job keeper (daemon.keeper) spawns it and reads its output: the job outlives this daemon,
and spawning costs the event loop a message instead of a fork. With `[daemon] keeper = false` the daemon spawns
it itself, as below: exit noticed through a pidfd (no thread, no SIGCHLD race), or where the kernel has no
pidfd_open (older Android kernels) a SIGCHLD handler; such a job dies with its daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio

from daemon import logging as log
from daemon.errors import SpawnError
from daemon.executors.base import OutputCallback, Process
from daemon.executors.keeper import AlreadyStarted, KeeperClient
from daemon.model import Command, ExitStatus
from daemon.output import JobOutput
from daemon.tools import with_limits

READ_SIZE = 256 * 1024
# Linux's limits on what a program can be given (the kernel refuses an exec past them with E2BIG): one argument
# or NAME=VALUE (MAX_ARG_STRLEN, NUL included), and a path (PATH_MAX). ARG_MAX, for all of them together, is the
# host's (a quarter of the stack limit). A row past them fails alone, before anything is sent to the keeper.
MAX_ARG_STRLEN = 32 * 4096
PATH_MAX = 4096
logger = log.get("local")


def has_exited(pid: int) -> bool:
    """Has our child `pid` exited? It stays a zombie (WNOWAIT): its pid, which is also its process group's id,
    cannot be reused until we reap it, so signalling the group until then never hits a stranger."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class _SigchldReaper:
    """Fallback exit detection: on SIGCHLD, poll each of our live children."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._children: dict[int, tuple[subprocess.Popen[bytes], Callable[[], None]]] = {}
        loop.add_signal_handler(signal.SIGCHLD, self._reap)

    def watch(self, popen: subprocess.Popen[bytes], on_exit: Callable[[], None]) -> None:
        self._children[popen.pid] = (popen, on_exit)
        self._reap()  # it may have exited before we registered

    def _reap(self) -> None:
        for pid, (_popen, on_exit) in list(self._children.items()):
            if has_exited(pid):
                del self._children[pid]
                on_exit()

    def close(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)


class LocalProcess:
    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop,
                 on_stdout: OutputCallback, on_stderr: OutputCallback, drain_timeout_s: float) -> None:
        self._popen = popen
        self._loop = loop
        self._drain_timeout_s = drain_timeout_s
        self._exited = loop.create_future()
        self._open: dict[int, OutputCallback] = {}
        self._drained = loop.create_future()
        self._signalled: int | None = None  # the last signal the daemon sent while it ran
        for pipe, callback in ((popen.stdout, on_stdout), (popen.stderr, on_stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self._open[fd] = callback
            loop.add_reader(fd, self._read, fd)

    @property
    def pid(self) -> int | None:
        return self._popen.pid

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._open[fd](data)
        else:
            self._stop_reading(fd)

    def _stop_reading(self, fd: int) -> None:
        self._loop.remove_reader(fd)
        del self._open[fd]
        if not self._open and not self._drained.done():
            self._drained.set_result(None)

    def _read_rest(self) -> None:
        """After the group is gone: take what is still in the pipes without waiting."""
        for fd in list(self._open):
            with contextlib.suppress(OSError):
                while data := os.read(fd, READ_SIZE):
                    self._open[fd](data)
            self._stop_reading(fd)

    def on_exit(self) -> None:
        if not self._exited.done():
            self._exited.set_result(None)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> ExitStatus:
        await asyncio.shield(self._exited)
        # Children left in the group may hold the pipes open: wait a little for them to finish writing.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._drained), self._drain_timeout_s)
        # The job ends with its main process; nothing it started in its group outlives it unrecorded. The leader
        # is still an unreaped zombie here, so the group id cannot have been reused.
        self.signal_group(signal.SIGKILL)
        returncode, cpu_s = self._reap()  # from now on signal_group does nothing
        self._read_rest()
        for pipe in (self._popen.stdout, self._popen.stderr):
            if pipe is not None:
                pipe.close()
        return dataclasses.replace(ExitStatus.from_returncode(returncode), signalled=self._signalled, cpu_s=cpu_s)

    def _reap(self) -> tuple[int, float | None]:
        """Reap the zombie, with its CPU time (a cpu_seconds limit's SIGKILL comes from the kernel, not a stranger)."""
        try:
            _pid, status, usage = os.wait4(self._popen.pid, 0)
        except ChildProcessError:
            return self._popen.wait(), None
        self._popen.returncode = os.waitstatus_to_exitcode(status)
        return self._popen.returncode, usage.ru_utime + usage.ru_stime

    def signal_group(self, signum: int) -> None:
        if self._popen.returncode is not None:
            return  # reaped: the pid may belong to someone else by now
        if not self.exited:  # a kill after the exit (of what it left in its group) does not explain the exit
            self._signalled = signum
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)

    detachable = False  # its pipes die with this daemon (until the per-host keeper of the next issue)

    def forget(self, *, remove: bool) -> None:
        pass


class LocalExecutor:
    def __init__(self, *, base_env: Mapping[str, str], default_cwd: Path, drain_timeout_s: float,
                 keeper: KeeperClient | None = None) -> None:
        self._keeper = keeper
        self._base_env = dict(base_env)
        self._default_cwd = default_cwd
        self._drain_timeout_s = drain_timeout_s
        self._reaper: _SigchldReaper | None = None
        self._use_pidfd = hasattr(os, "pidfd_open")
        self._programs: dict[tuple[str, str], str | None] = {}  # (name, PATH) -> absolute path

    def _program(self, name: str, env: Mapping[str, str]) -> str:
        """The absolute path of `name` on the job's PATH, looked up once: the child then execs it directly
        instead of trying every PATH entry (Termux has no /bin/bash; bash is wherever PATH says)."""
        search = env.get("PATH", os.defpath)
        key = (name, search)
        if key not in self._programs:
            self._programs[key] = shutil.which(name, path=search)
        found = self._programs[key]
        if found is None:
            raise SpawnError(f"{name!r} was not found on PATH ({search}); install it or fix PATH")
        return found

    def _prepare(self, command: Command) -> tuple[tuple[str, ...], dict[str, str], str]:
        """argv with its program's absolute path, the environment, the working directory: or a SpawnError. (The
        keeper says the same of a working directory it cannot enter: no stat here for every job.)"""
        cwd = command.cwd if command.cwd is not None else str(self._default_cwd)
        if self._keeper is None and not os.path.isdir(cwd):
            raise SpawnError(f"working directory {cwd!r} does not exist or is not a directory")
        env = command.environment(self._base_env)
        argv = (self._program(command.argv[0], env), *command.argv[1:])
        if command.limits:  # the job's program looked up first: a missing one is a clear SpawnError under sh too
            wrapped = with_limits(argv, command.limits)
            argv = (self._program(wrapped[0], env), *wrapped[1:])
        _check_sizes(argv, env, cwd)
        return argv, env, cwd

    def _spawn(self, command: Command) -> subprocess.Popen[bytes]:
        argv, env, cwd = self._prepare(command)
        try:
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=env, start_new_session=True, close_fds=True,
            )
        except FileNotFoundError as e:  # removed since it was looked up
            self._programs.clear()
            raise SpawnError(f"{argv[0]!r} cannot be found any more; install it or fix PATH") from e
        except PermissionError as e:
            raise SpawnError(f"permission denied starting {command.argv[0]!r} in {cwd!r}: {e.strerror}") from e
        except OSError as e:
            raise SpawnError(f"cannot start {command.argv[0]!r}: {e.strerror or e}") from e

    def _watch_exit(self, popen: subprocess.Popen[bytes], process: LocalProcess,
                    loop: asyncio.AbstractEventLoop) -> None:
        if self._use_pidfd:
            try:
                pidfd = os.pidfd_open(popen.pid)
            except OSError as e:
                if e.errno not in (errno.ENOSYS, errno.EPERM):
                    raise
                self._use_pidfd = False  # e.g. an Android kernel or seccomp policy without pidfd_open
            else:
                def exited() -> None:
                    if has_exited(popen.pid):
                        loop.remove_reader(pidfd)
                        os.close(pidfd)
                        process.on_exit()

                loop.add_reader(pidfd, exited)
                return
        if self._reaper is None:
            self._reaper = _SigchldReaper(loop)
        self._reaper.watch(popen, process.on_exit)

    @property
    def can_reattach(self) -> bool:
        return self._keeper is not None

    async def ready(self) -> None:
        """Find or start the keeper (nothing to do without one); SpawnError if it cannot be reached or started."""
        if self._keeper is not None:
            await self._keeper.connect()

    async def holds(self, keys: list[str]) -> set[str]:
        """Which of these attempts this host's keeper holds (none without a keeper)."""
        return await self._keeper.holds(keys) if self._keeper is not None else set()

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        pass  # nothing of a local job is left behind once its process group is gone (or its keeper forgot it)

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        """Kill and let go what this host's keeper still holds of attempts the database holds finished or re-queued
        (see Dispatcher._kill_local_orphans for how they come about). The attempt keys killed."""
        if self._keeper is None or not await self._keeper.holds([]):  # holds nothing: no query of every row
            return []
        keys = [f"{job_id}:{attempt}" for job_id, attempt in await finished_attempts()]
        held = sorted(await self._keeper.holds(keys)) if keys else []
        for key in held:
            process = await self._keeper.attach(key, JobOutput(1024), _ignore, _ignore)
            process.signal_group(signal.SIGKILL)
            with anyio.move_on_after(5):
                await process.wait()
            process.forget(remove=True)
        return held

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> Process:
        if self._keeper is None:
            raise SpawnError("a local job cannot be found again after its daemon stopped (keeper = false)")
        return await self._keeper.attach(key, output, on_stdout, on_stderr)

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput | None = None) -> Process:
        if self._keeper is not None:
            argv, env, cwd = self._prepare(command)
            key = command.key or f"unnamed:{os.urandom(8).hex()}"
            output = output or JobOutput(1 << 20)
            try:
                return await self._keeper.spawn(key, list(argv), env, cwd, output, on_stdout, on_stderr,
                                                self._drain_timeout_s)
            except AlreadyStarted:  # the same attempt, claimed again by a row that forgot it: follow it, never twice
                logger.warning("job.already_started", key=key, action="following the attempt the keeper holds")
                return await self._keeper.attach(key, output, on_stdout, on_stderr)
        loop = asyncio.get_running_loop()
        # Spawning inline measured faster than in a worker thread on 3.11: fork_exec holds the GIL throughout.
        popen = self._spawn(command)
        process = LocalProcess(popen, loop, on_stdout, on_stderr, self._drain_timeout_s)
        self._watch_exit(popen, process, loop)
        return process

    async def output(self, command: Command, timeout_s: float) -> str:
        env = command.environment(self._base_env)
        try:
            with anyio.fail_after(timeout_s):
                argv = [self._program(command.argv[0], env), *command.argv[1:]]
                result = await anyio.run_process(argv, env=env, check=False)
        except (OSError, SpawnError, TimeoutError) as e:
            logger.warning("command.failed", argv=list(command.argv), error=str(e) or type(e).__name__)
            return ""
        return result.stdout.decode(errors="replace")

    async def aclose(self) -> None:
        if self._keeper is not None:
            self._keeper.close()
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None


def _size(text: str) -> int:
    """Bytes as the kernel gets them, NUL included (counted only where characters alone could be too many)."""
    return len(text) + 1 if len(text) * 4 < MAX_ARG_STRLEN else len(text.encode("utf-8", "surrogatepass")) + 1


def _check_sizes(argv: tuple[str, ...], env: Mapping[str, str], cwd: str) -> None:
    """SpawnError if no program could be given these: a variable, an argument or the working directory past
    Linux's limits, or all of them past the host's ARG_MAX."""
    if _size(cwd) > PATH_MAX:
        raise SpawnError(f"working directory {cwd[:60]!r}... is {_size(cwd) - 1} bytes long: more than the "
                         f"{PATH_MAX - 1} bytes of a path (PATH_MAX); use a shorter path")
    total = 8 * (len(argv) + len(env))  # the pointers to them count too
    for i, arg in enumerate(argv):
        if (size := _size(arg)) > MAX_ARG_STRLEN:
            raise _too_long(f"argument {i}", size)
        total += size
    for name, value in env.items():
        if (size := _size(name) + _size(value)) > MAX_ARG_STRLEN:
            raise _too_long(f"variable {name[:60]}", size)
        total += size
    arg_max = os.sysconf("SC_ARG_MAX")
    if total > arg_max:
        raise SpawnError(f"the arguments and environment come to {total} bytes: more than the {arg_max} this host "
                         "passes to a program (ARG_MAX, `getconf ARG_MAX`); pass big data in a file")


def _too_long(what: str, size: int) -> SpawnError:
    return SpawnError(f"{what} is {size - 1} bytes: more than the {MAX_ARG_STRLEN - 1} bytes Linux passes to a "
                      "program as one argument or variable (MAX_ARG_STRLEN); pass big data in a file")


def _ignore(_: bytes) -> None:
    pass  # an orphan's output: its row is final, or belongs to another attempt now
