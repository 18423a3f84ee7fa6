"""Termux's wake lock (termux-wake-lock, termux-wake-unlock): held while jobs run, so that Android neither puts the
CPU to sleep nor lets Doze freeze Termux under a running job, and released a while after the last one ended."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import anyio

from daemon import logging as log
from daemon.config import AndroidConfig
from daemon.hooks import Activity

logger = log.get("android")
LOCK, UNLOCK = "termux-wake-lock", "termux-wake-unlock"
COMMAND_TIMEOUT_S = 15.0  # the `am startservice` behind each command can take seconds on a slow phone


class WakeLock(Activity):
    """[android] wake_lock: "while-running" takes the lock when the dispatcher gets its first job and releases it
    `wake_lock_release_ms` after its last one ended (a job in between keeps it); "always" takes it at start and
    never releases it; "never" (and any setting off Termux) touches nothing.

    Termux's lock is one switch, not a count: releasing it releases it for whoever took it (NexusCLI's server
    takes it too), which is why a user who holds it for other reasons chooses "always" or "never". The commands run
    one at a time in `run`'s task; a missing or failing one is logged once and never holds up a job."""

    def __init__(self, android: AndroidConfig, settings_file: str) -> None:
        self.mode = android.wake_lock if android.holds_wake_lock else "never"
        self._release_after_s = android.wake_lock_release_ms / 1000
        self._path = android.path
        self._settings_file = settings_file
        self._want = self.mode == "always"
        self._held = False  # taken by this daemon (or being taken), as far as it knows
        self._changed = asyncio.Event()
        self._changed.set()  # "always": the first pass takes it
        self._release: asyncio.TimerHandle | None = None  # pending while the last job's end is recent
        self._said: set[str] = set()  # the commands whose failure was logged

    def busy(self) -> None:
        if self.mode == "while-running":
            self._want = True
            self._cancel_release()
            self._changed.set()

    def idle(self) -> None:
        if self.mode == "while-running":
            self._want = False
            self._cancel_release()
            self._release = asyncio.get_running_loop().call_later(self._release_after_s, self._release_due)

    def _release_due(self) -> None:
        self._release = None
        self._changed.set()

    def _cancel_release(self) -> None:
        if self._release is not None:
            self._release.cancel()
            self._release = None

    async def run(self) -> None:
        """Take and release the lock as the jobs come and go, until cancelled. No timer of its own while idle."""
        if self.mode == "never":
            return
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self._want and not self._held:
                self._held = True  # before the command: a stop that cancels it mid-way still releases it
                self._held = await self._call(LOCK, "always" if self.mode == "always" else "a job started")
            elif not self._want and self._held and self._release is None:
                self._held = False
                await self._call(UNLOCK, f"no job ran for {self._release_after_s:g} s")

    async def stop(self, *, jobs_left: int) -> None:
        """The daemon stops. What it took for jobs is released now, unless jobs run on without it (left to the next
        daemon, which releases it once they end); "always" keeps it."""
        self._cancel_release()
        if self.mode != "while-running" or not self._held:
            return
        if jobs_left:
            logger.info("android.wake_lock", held=True, reason=f"kept: {jobs_left} jobs run on for the next daemon")
            return
        self._held = False
        with anyio.CancelScope(shield=True):
            await self._call(UNLOCK, "the daemon stopped")

    async def _call(self, command: str, reason: str) -> bool:
        program = shutil.which(command, path=self._path)
        if program is None:
            return self._failed(command, f"{command} is not on PATH ({self._path})",
                                "install Termux's termux-tools package (pkg install termux-tools)")
        try:
            with anyio.fail_after(COMMAND_TIMEOUT_S):
                result = await anyio.run_process([program], check=False, stdin=subprocess.DEVNULL)
        except TimeoutError:
            return self._failed(command, f"it did not end within {COMMAND_TIMEOUT_S:g} s",
                                f"run {command} in a Termux session to see why")
        except OSError as e:
            return self._failed(command, f"it could not be run: {e}", "reinstall termux-tools (pkg install "
                                "--reinstall termux-tools)")
        if result.returncode != 0:
            said = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
            return self._failed(command, f"it exited with status {result.returncode}{': ' + said[-1] if said else ''}",
                                f"run {command} in a Termux session to see why (the Termux app must be installed "
                                "and allowed to start its service)")
        logger.info("android.wake_lock", held=command == LOCK, reason=reason)
        return True

    def _failed(self, command: str, error: str, fix: str) -> bool:
        """Logged the first time only: the next job tries again, silently; jobs run either way."""
        if command not in self._said:
            self._said.add(command)
            logger.warning("android.wake_lock_failed", command=command, error=error,
                           fix=f"{fix}; or set [android] wake_lock = \"never\" in {self._settings_file} to leave the "
                               "lock to you", consequence="jobs run on; the phone may sleep under them")
        return False
