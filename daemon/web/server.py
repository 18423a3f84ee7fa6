"""`nexus-jobd web`: open the store as the CLI does, load (or make) the token, bind, print the login URL, serve."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from daemon import config, output
from daemon import logging as log
from daemon.errors import ConfigError, DatabaseError
from daemon.store import DbError, Store, open_store

logger = log.get("web")
GRACEFUL_STOP_S = 2  # open streams (they never end by themselves) are closed this long after SIGTERM


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login_url(host: str, port: int, token: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # every interface: this host's loopback reaches it too
        host = "127.0.0.1"
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def allowed_hosts(cfg: config.WebConfig) -> frozenset[str]:
    """The names the Host header may give besides IP addresses: localhost, the listen host, [web] allowed_hosts."""
    return frozenset({"localhost", cfg.listen[0].lower(), *cfg.allowed_hosts})


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        raise ConfigError(f"[web] listen = \"{host}:{port}\": cannot listen there: {e.strerror or e}; choose another "
                          "port (--listen HOST:PORT) or stop what uses it") from e
    sock.setblocking(False)
    return sock


async def _open(cfg: config.Config) -> Store:
    """The database as the CLI opens it for writing (migrated: PostgreSQL gets the console's notifications); a
    file this user may only read is served read-only (cancel, retry and submit then say why they cannot)."""
    store = await open_store(cfg.db_target, busy_timeout_ms=cfg.busy_timeout_ms, create=False, read_only_ok=True)
    if store.read_only:
        return store
    try:
        await store.migrate()
    except BaseException as e:
        await store.close()
        if isinstance(e, DbError):
            raise DatabaseError(f"{cfg.db_name}: not a usable database: adding the daemon's tables and columns "
                                f"failed: {e}") from e
        raise
    return store


def _server(app: Any, on_exit: Callable[[], None]) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's, but SIGTERM and SIGINT end serve() and that is all: uvicorn itself raises the signal again
        once it returns, which would kill the process before the store is closed and the stop logged."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            on_exit()  # open streams end now, so that the server stops at once instead of after its grace
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    return Server(uvicorn.Config(app, log_config=None, access_log=False, http="h11", ws="none", lifespan="on",
                                 server_header=False, date_header=False, timeout_graceful_shutdown=GRACEFUL_STOP_S))


async def serve(cfg: config.Config) -> int:
    from daemon.web.app import build
    from daemon.web.auth import load_token
    from daemon.web.hub import Hub

    token = load_token(cfg.web.token_file)
    output.map_big_blocks_apart()  # a big column read and sent is given back to the system, as the daemon does
    host, port = cfg.web.listen
    sock = bind(host, port)
    port = sock.getsockname()[1]
    store = await _open(cfg)
    try:
        hub = Hub(store, cfg)
        server = _server(build(hub, token=token, allowed_hosts=allowed_hosts(cfg.web)), hub.stop)
        logger.info("web.started", listen=f"{host}:{port}", db=cfg.db_name, read_only=store.read_only)
        if not is_loopback(host):
            logger.warning("web.not_loopback", listen=f"{host}:{port}",
                           note="reachable from other machines: anyone who has the token can run commands")
        print(f"nexus-jobd web: open {login_url(host, port, token)}", file=sys.stderr, flush=True)
        await server.serve(sockets=[sock])
    finally:
        await store.close()
        sock.close()
    logger.info("web.stopped")
    return 0


def url(cfg: config.Config) -> str:
    from daemon.web.auth import load_token

    host, port = cfg.web.listen
    return login_url(host, port, load_token(cfg.web.token_file))


def with_listen(cfg: config.Config, listen: str | None) -> config.Config:
    if listen is None:
        return cfg
    return replace(cfg, web=replace(cfg.web, listen=config.parse_listen(listen)))
