"""Jobs the daemon spawns itself (`[daemon] keeper = false`): its own children, in their own session and process
group (so no controlling terminal: nothing can stop to prompt on /dev/tty), stdin from /dev/null. Exit is noticed
through a pidfd (no thread, no SIGCHLD race), or where the kernel has no pidfd_open (older Android kernels) a SIGCHLD
handler. Such a job dies with its daemon: nothing can find it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

from daemon.errors import SpawnError
from daemon.executors.base import OutputCallback
from daemon.executors.host import HostExecutor
from daemon.model import Command, ExitStatus
from daemon.output import JobOutput

READ_SIZE = 256 * 1024


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


class ChildProcess:
    """A child of this daemon: its pipes read on the event loop, its end noticed by ChildExecutor."""

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

    detachable = False  # its pipes die with this daemon

    def forget(self, *, remove: bool) -> None:
        pass


class ChildExecutor(HostExecutor):
    """This machine's jobs as the daemon's own children."""

    can_reattach = False
    _reaper: _SigchldReaper | None = None  # made on the first job where there is no pidfd_open
    _use_pidfd = hasattr(os, "pidfd_open")

    def _working_dir(self, command: Command) -> str:
        """Checked here, before the fork: a child that cannot enter it could only say so with an exec error."""
        cwd = super()._working_dir(command)
        if not os.path.isdir(cwd):
            raise SpawnError(f"working directory {cwd!r} does not exist or is not a directory")
        return cwd

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput) -> ChildProcess:
        loop = asyncio.get_running_loop()
        # Spawning inline measured faster than in a worker thread on 3.11: fork_exec holds the GIL throughout.
        popen = self._spawn(command)
        process = ChildProcess(popen, loop, on_stdout, on_stderr, self._drain_timeout_s)
        self._watch_exit(popen, process, loop)
        return process

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

    def _watch_exit(self, popen: subprocess.Popen[bytes], process: ChildProcess,
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

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> ChildProcess:
        raise SpawnError("a local job cannot be found again after its daemon stopped (keeper = false)")

    async def ready(self) -> None:
        pass  # nothing to start: the daemon spawns its jobs itself

    async def holds(self, keys: list[str]) -> set[str]:
        return set()  # nothing holds a stopped daemon's children for another to adopt (recovery kills them by pid)

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        return []  # no keeper here holds attempts whose rows are final

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        pass  # nothing of a local job is left behind once its process group is gone

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None
