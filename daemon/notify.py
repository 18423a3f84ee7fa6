"""sd_notify: READY, STATUS, WATCHDOG and STOPPING to systemd over its unix datagram socket.

A few lines, no dependency: `NOTIFY_SOCKET` is a path, or an abstract socket when it starts with '@'.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import contextlib
import socket

from daemon import logging as log

logger = log.get("notify")


class Notifier:
    def __init__(self, notify_socket: str | None, watchdog_usec: int | None) -> None:
        self._address: str | None = None
        if notify_socket:
            self._address = "\0" + notify_socket[1:] if notify_socket.startswith("@") else notify_socket
        self._sock: socket.socket | None = None
        self.watchdog_interval_s = watchdog_usec / 2_000_000 if watchdog_usec else None  # ping at half the limit

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> None:
        """e.g. send(READY=1, STATUS='running 2'): one datagram of NAME=value lines."""
        if self._address is None:
            return
        message = "\n".join(f"{name}={value}" for name, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address)
        except OSError as e:  # systemd gone or the socket unreachable: the daemon itself goes on
            logger.warning("notify.failed", error=str(e), message=message.decode(errors="replace"))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
