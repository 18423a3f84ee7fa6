"""The one interface dispatch drives, whatever runs the job."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from daemon.tools import Command

OutputCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: `code` follows the shell (128+N when killed by signal N)."""

    code: int
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Popen's convention (negative = killed by that signal) -> the shell's."""
        if returncode < 0:
            return cls(128 - returncode, -returncode)
        return cls(returncode)


class ConnectionLost(Exception):
    """The link to the node dropped while the job ran: it did not succeed, whatever the remote side did."""


class SpawnError(Exception):
    """The command could not be started (exit code 127); the message says why."""


class Process(Protocol):
    """A started job: its output goes to the callbacks given to `Executor.start` as it arrives."""

    @property
    def pid(self) -> int | None:
        """The process group id on this host, for crash recovery; None where it is not a local pid."""
        ...

    @property
    def exited(self) -> bool:
        """The main process has ended (its output may still be draining): a stop request comes too late."""
        ...

    async def wait(self) -> ExitStatus:
        """Wait for the process to end and its output to drain."""
        ...

    def signal_group(self, signum: int) -> None:
        """Send a signal to the job's whole process group (a no-op once it is gone)."""
        ...


class Executor(Protocol):
    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback) -> Process:
        """Start `command`; raises SpawnError when it cannot be started."""
        ...

    async def output(self, command: Command, timeout_s: float) -> str:
        """A short command of the daemon's own on the node (e.g. `docker stop`): its stdout, or "" if it could
        not be run; the reason is logged."""
        ...

    async def aclose(self) -> None: ...
