"""Lifecycle of the daemon: open and migrate the database, run the dispatcher, drain on SIGTERM/SIGINT.

The first signal stops claiming and lets running jobs finish (up to shutdown_grace); a second one
terminates them at once. Signal handlers only set flags; the loop does the work.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket

from daemon import logging as log
from daemon.config import Config
from daemon.dispatch import Dispatcher
from daemon.errors import ConfigError
from daemon.executors.base import Executor
from daemon.executors.local import LocalExecutor
from daemon.lease import Identity, Lease
from daemon.store import Store

logger = log.get("service")


def new_worker_id() -> str:
    """Unique per daemon process, and readable: which host and pid hold a claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"


def _executors(config: Config) -> dict[str, Executor]:
    local = LocalExecutor(base_env=config.job_environment, default_cwd=config.default_cwd,
                          drain_timeout_s=config.drain_timeout_ms / 1000)
    return {config.local_node: local}


def _check_paths(config: Config) -> None:
    if not config.default_cwd.is_dir():
        raise ConfigError(
            f"{config.source}: [daemon] default_cwd = {str(config.default_cwd)!r} is not a directory; "
            "create it or set default_cwd to an existing directory (jobs without a cwd run there)"
        )


async def serve(config: Config, *, install_signals: bool = True, stop: asyncio.Event | None = None) -> int:
    """Run until stopped; returns the process exit code (0 after a clean drain)."""
    _check_paths(config)
    store = await Store.open(config.db_path, busy_timeout_ms=config.busy_timeout_ms)
    try:
        await store.migrate()
        stop = stop or asyncio.Event()
        lost = asyncio.Event()

        def on_lease_lost() -> None:  # another daemon took our jobs: stop them and exit loudly
            lost.set()
            stop.set()
            dispatcher.stop_all("lease lost")

        lease = Lease(store, Identity.of_this_process(new_worker_id()), ttl_ms=config.lease_ttl_ms,
                      on_lost=on_lease_lost)
        await lease.register()  # also recovers the jobs of daemons that died (our own previous run included)
        executors = _executors(config)
        dispatcher = Dispatcher(config, store, executors, lease)
        if install_signals:
            _install_signals(stop, dispatcher)
        logger.info("daemon.started", db=str(config.db_path), config=config.source, pid=os.getpid(),
                    worker_id=dispatcher.worker_id)
        try:
            await dispatcher.run(stop)
        finally:
            for executor in executors.values():
                await executor.aclose()
        if lost.is_set():
            logger.error("daemon.stopped", worker_id=dispatcher.worker_id, reason="lease lost")
            return 1
        await lease.release()
        logger.info("daemon.stopped", worker_id=dispatcher.worker_id)
        return 0
    finally:
        await store.close()


def _install_signals(stop: asyncio.Event, dispatcher: Dispatcher) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            logger.info("daemon.stopping", signal=signal.Signals(signum).name, running=len(dispatcher.running))
            stop.set()
            dispatcher.wake()
        else:
            logger.warning("daemon.stopping_now", signal=signal.Signals(signum).name,
                           running=len(dispatcher.running))
            dispatcher.stop_all("shutdown")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
