"""The one interface dispatch drives, whatever runs the job."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from daemon.errors import SpawnError
from daemon.model import Command, ExitStatus
from daemon.output import JobOutput

OutputCallback = Callable[[bytes], None]
HELPER_OUTPUT_MAX = 1024 * 1024  # the most stdout read of a command of the daemon's own (a sweep's ls, docker ps)


class UntrustedNode(SpawnError):
    """The node answers, but must not be used until someone fixes it (its host key is unknown or changed)."""


class OutputTooLong(SpawnError):
    """A command of the daemon's own printed more than it may; `partial` holds what was read."""

    def __init__(self, message: str, partial: str) -> None:
        super().__init__(message)
        self.partial = partial

    @property
    def complete_lines(self) -> str:
        """`partial` up to its last newline: no name cut in two."""
        return self.partial[: self.partial.rfind("\n") + 1]


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

    @property
    def detachable(self) -> bool:
        """It runs on without this daemon (a detached remote job): a stopping daemon may leave it to the next."""
        ...

    def forget(self, *, remove: bool) -> None:
        """The row is final (or no longer ours): let go of the job; `remove` what it left where it ran."""
        ...


class Executor(Protocol):
    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput) -> Process:
        """Start `command`; raises SpawnError when it cannot be started. `output` is where the callbacks feed:
        a remote reader asks it how much it has (its offsets) and whether it may send only the tail."""
        ...

    @property
    def can_reattach(self) -> bool:
        """Its jobs outlive this daemon and can be found again by `reattach`."""
        ...

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> Process:
        """Follow again the attempt `key` ("<job id>:<attempt>") started earlier, from `output`'s byte counts."""
        ...

    async def ready(self) -> None:
        """Get what runs jobs ready now (find or start the host's keeper), not when the first job waits for it;
        SpawnError if it cannot be. Nothing to do for most executors."""
        ...

    async def holds(self, keys: list[str]) -> set[str]:
        """Which of these attempts still run here, or ended with an end nobody recorded (what a dead daemon's
        recovery may adopt); SpawnError if that cannot be asked now (not knowing is not "gone")."""
        ...

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        """At start-up, before claiming: kill and let go what still runs (or is held) of attempts this database
        has final or back in the queue; the keys killed."""
        ...

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        """Remove what attempts that no longer run left where they ran (`finished_attempts`: this database's
        (job id, attempt) pairs there that can no longer be running, read after looking); nothing else."""
        ...

    async def output(self, command: Command, timeout_s: float) -> str:
        """A short command of the daemon's own on the node (e.g. `docker stop`): its stdout, or "" if it could
        not be run; the reason is logged."""
        ...

    async def run(self, script: str, timeout_s: float, *, limit: int) -> str:
        """A short `sh` script of the daemon's own on the node (a probe): its stdout. Raises where `output` would
        log: OutputTooLong past `limit` bytes, UntrustedNode for a node that must not be used (a refused host
        key), NodeUnreachable or another SpawnError if it could not be run, TimeoutError past `timeout_s`."""
        ...

    async def aclose(self) -> None: ...
