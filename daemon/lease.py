"""This daemon's lease: registered on the database, renewed three times per period, released at a clean stop; and
noticing that another daemon declared us dead (the lease is lost). What becomes of a dead daemon's jobs: recovery.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from daemon import logging as log
from daemon import procs, ticks
from daemon.model import Worker
from daemon.store import Store, survive_db_errors

logger = log.get("lease")


@dataclass(frozen=True)
class Identity:
    """Who this daemon is, in terms another daemon on the same host can check."""

    worker_id: str
    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None

    @classmethod
    def of_this_process(cls, worker_id: str) -> Identity:
        pid = os.getpid()
        return cls(worker_id, socket.gethostname(), procs.boot_id(), pid, procs.start_time(pid))

    def same_boot(self, worker: Worker) -> bool:
        return worker.host == self.host and worker.boot_id is not None and worker.boot_id == self.boot_id


class Lease:
    def __init__(self, store: Store, me: Identity, *, ttl_ms: int, nodes: Sequence[str], on_lost: Callable[[], None],
                 on_beat: Callable[[], Awaitable[None]], on_db_error: Callable[[], None],
                 pools: Mapping[str, Any] | None = None) -> None:
        """`on_beat`: what each renewal is followed by (recovery of dead daemons' jobs); `on_db_error`: a write
        failed (the metrics count it); `pools`: those it serves, as registered (the heartbeats keep them current)."""
        self._store, self.me, self._ttl_ms, self._nodes, self._pools = store, me, ttl_ms, nodes, pools
        self._on_lost, self._on_beat, self._on_db_error = on_lost, on_beat, on_db_error

    async def register(self) -> None:
        await self._store.register_worker(worker_id=self.me.worker_id, host=self.me.host, boot_id=self.me.boot_id,
                                          pid=self.me.pid, pid_start=self.me.pid_start, nodes=self._nodes,
                                          pools=self._pools)
        await self._on_beat()

    async def run(self) -> None:
        """Renew the lease and look for dead daemons, three times per lease period (on the ticks' grid: the other
        periodic duties of an idle daemon wake with it)."""
        while True:
            await ticks.sleep_until_next(self._ttl_ms / 3000)
            # Missed for a whole ttl, others declare us dead.
            async with survive_db_errors("lease heartbeat", self._on_db_error):
                if not await self._store.heartbeat(self.me.worker_id):
                    logger.error("lease.lost", worker_id=self.me.worker_id,
                                 reason="another daemon declared this one dead and recovered its jobs")
                    self._on_lost()
                    return
                await self._on_beat()

    async def release(self, reason: str = "clean shutdown") -> None:
        """Mark this daemon stopped. Jobs it detached stay `executing` under its id: the next daemon (or any live one
        serving their node) adopts them."""
        # Unreleased, it expires: others recover nothing of ours.
        async with survive_db_errors("lease release", self._on_db_error):
            await self._store.stop_worker(self.me.worker_id, reason)
