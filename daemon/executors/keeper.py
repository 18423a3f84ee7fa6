"""Jobs the host's keeper spawns (the default): the keeper (daemon.keeper) is their parent and reads their output,
so a job outlives this daemon and the next one follows it again; spawning costs the event loop a message instead
of a fork. Each job in its own session and process group, stdin from /dev/null, as the keeper starts it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import anyio

from daemon import logging as log
from daemon.executors.base import OutputCallback
from daemon.executors.host import HostExecutor
from daemon.keeper.client import AlreadyStarted, KeeperClient, KeeperProcess
from daemon.model import Command
from daemon.output import JobOutput

logger = log.get("local")
KILL_WAIT_S = 5.0  # how long an orphan killed at start-up may take to be gone before it is let go of anyway


class KeeperExecutor(HostExecutor):
    """This machine's jobs, spawned and held by the keeper `client` talks to."""

    can_reattach = True

    def __init__(self, client: KeeperClient, *, base_env: Mapping[str, str], default_cwd: Path,
                 drain_timeout_s: float) -> None:
        super().__init__(base_env=base_env, default_cwd=default_cwd, drain_timeout_s=drain_timeout_s)
        self._keeper = client

    async def start(self, command: Command, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                    output: JobOutput) -> KeeperProcess:
        argv, env, cwd = self._prepare(command)
        key = command.key or f"unnamed:{os.urandom(8).hex()}"
        try:
            return await self._keeper.spawn(key, list(argv), env, cwd, output, on_stdout, on_stderr,
                                            self._drain_timeout_s)
        except AlreadyStarted:  # the same attempt, claimed again by a row that forgot it: follow it, never twice
            logger.warning("job.already_started", key=key, action="following the attempt the keeper holds")
            return await self._keeper.attach(key, output, on_stdout, on_stderr)

    async def reattach(self, key: str, on_stdout: OutputCallback, on_stderr: OutputCallback, *,
                       output: JobOutput) -> KeeperProcess:
        return await self._keeper.attach(key, output, on_stdout, on_stderr)

    async def ready(self) -> None:
        """Find or start the keeper; SpawnError if it can be neither reached nor started."""
        await self._keeper.connect()

    async def holds(self, keys: list[str]) -> set[str]:
        """Which of these attempts this host's keeper holds."""
        return await self._keeper.holds(keys)

    async def kill_orphans(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> list[str]:
        """Kill and let go what this host's keeper still holds of attempts the database holds finished or re-queued
        (see dispatch.chores.kill_orphans for how they come about). The attempt keys killed."""
        if not await self._keeper.holds([]):  # holds nothing: no query of every row
            return []
        keys = [f"{job_id}:{attempt}" for job_id, attempt in await finished_attempts()]
        held = sorted(await self._keeper.holds(keys)) if keys else []
        for key in held:
            process = await self._keeper.attach(key, JobOutput(1024), _ignore, _ignore)
            process.signal_group(signal.SIGKILL)
            with anyio.move_on_after(KILL_WAIT_S):
                await process.wait()
            process.forget(remove=True)
        return held

    async def sweep(self, finished_attempts: Callable[[], Awaitable[list[tuple[str, int]]]]) -> None:
        pass  # the keeper forgets a job with its process group: nothing is left behind on this host

    async def aclose(self) -> None:
        self._keeper.close()


def _ignore(_: bytes) -> None:
    pass  # an orphan's output: its row is final, or belongs to another attempt now
