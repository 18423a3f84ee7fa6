"""What the executors of this machine share, whoever spawns the job (the daemon itself, or the host's keeper): the
program looked up on the job's PATH, the environment and working directory, Linux's limits on what a program can be
given, and the daemon's own short commands here.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio

from daemon import logging as log
from daemon.errors import SpawnError
from daemon.executors.base import HELPER_OUTPUT_MAX, OutputTooLong
from daemon.model import Command
from daemon.tools import with_limits

# Linux's limits on what a program can be given (the kernel refuses an exec past them with E2BIG): one argument
# or NAME=VALUE (MAX_ARG_STRLEN, NUL included), and a path (PATH_MAX). ARG_MAX, for all of them together, is the
# host's (a quarter of the stack limit). A row past them fails alone, before anything is sent to the keeper.
MAX_ARG_STRLEN = 32 * 4096
PATH_MAX = 4096
logger = log.get("local")


class HostExecutor:
    """The part of an executor of this machine that is the same whoever spawns the job; `start` and the reattach
    abilities are the subclass's."""

    def __init__(self, *, base_env: Mapping[str, str], default_cwd: Path, drain_timeout_s: float) -> None:
        self._base_env = dict(base_env)
        self._default_cwd = str(default_cwd)
        self._drain_timeout_s = drain_timeout_s
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

    def _working_dir(self, command: Command) -> str:
        """Where the job runs. (The keeper says itself when it cannot enter it: no stat here for every job.)"""
        return command.cwd if command.cwd is not None else self._default_cwd

    def _prepare(self, command: Command) -> tuple[tuple[str, ...], dict[str, str], str]:
        """argv with its program's absolute path, the environment, the working directory: or a SpawnError."""
        cwd = self._working_dir(command)
        env = command.environment(self._base_env)
        argv = (self._program(command.argv[0], env), *command.argv[1:])
        if command.limits:  # the job's program looked up first: a missing one is a clear SpawnError under sh too
            wrapped = with_limits(argv, command.limits)
            argv = (self._program(wrapped[0], env), *wrapped[1:])
        check_sizes(argv, env, cwd)
        return argv, env, cwd

    async def _stdout(self, argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> bytes:
        with anyio.fail_after(timeout_s):
            found = [self._program(argv[0], env), *argv[1:]]
            return (await anyio.run_process(found, env=env, check=False)).stdout

    async def output(self, command: Command, timeout_s: float) -> str:
        try:
            stdout = await self._stdout(command.argv, command.environment(self._base_env), timeout_s)
        except (OSError, SpawnError, TimeoutError) as e:
            logger.warning("command.failed", argv=list(command.argv), error=str(e) or type(e).__name__)
            return ""
        return stdout.decode(errors="replace")

    async def run(self, script: str, timeout_s: float, *, limit: int = HELPER_OUTPUT_MAX) -> str:
        """`sh -c script` here, in the jobs' environment: its stdout; OutputTooLong past `limit` bytes, SpawnError
        if it cannot be started, TimeoutError past `timeout_s`."""
        try:
            stdout = await self._stdout(("sh", "-c", script), self._base_env, timeout_s)
        except OSError as e:
            raise SpawnError(f"cannot run sh on this host: {e.strerror or e}") from e
        text = stdout[:limit].decode("utf-8", "replace")
        if len(stdout) > limit:
            raise OutputTooLong(f"a command of the daemon's own printed more than {limit} bytes", text)
        return text


def _size(text: str) -> int:
    """Bytes as the kernel gets them, NUL included (counted only where characters alone could be too many)."""
    return len(text) + 1 if len(text) * 4 < MAX_ARG_STRLEN else len(text.encode("utf-8", "surrogatepass")) + 1


def check_sizes(argv: tuple[str, ...], env: Mapping[str, str], cwd: str) -> None:
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
