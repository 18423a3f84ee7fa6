"""A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` package, initdb and pg_ctl in a temp
dir, as the `postgres` user when run as root (initdb and the server refuse root), on a unix socket in that dir.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def bin_dir() -> Path | None:
    """The newest server installed by Debian's packages (/usr/lib/postgresql/N/bin), or one on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


@dataclass
class Server:
    socket_dir: Path
    port: int
    bin: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql:///{database}?host={self.socket_dir}&port={self.port}&user=postgres"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return subprocess.run([str(self.bin / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", self.url(database),
                               "-c", sql], check=True, capture_output=True, text=True).stdout

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.socket_dir / "data"), "-m", mode, "-w", "stop"])

    def start(self) -> None:
        options = f"-k {self.socket_dir} -p {self.port} -c listen_addresses='' -c fsync=off " \
                  "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        _as_owner([str(self.bin / "pg_ctl"), "-D", str(self.socket_dir / "data"), "-l",
                   str(self.socket_dir / "server.log"), "-o", options, "-w", "start"])


def _as_owner(argv: list[str]) -> None:
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    subprocess.run(argv, check=True, capture_output=True, cwd="/")


@contextlib.contextmanager
def running_server(port: int = 54329) -> Iterator[Server]:
    """A throwaway server (fsync off: its data lives as long as the tests) in a temp dir, on a unix socket."""
    pg_bin = bin_dir()
    if pg_bin is None:
        raise FileNotFoundError("no PostgreSQL server (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="nexus-jobd-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    root.chmod(0o755)  # the daemons under test (root, or this user) reach the socket in it
    server = Server(root, port + os.getpid() % 1000, pg_bin)
    try:
        _as_owner([str(pg_bin / "initdb"), "-D", str(root / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                   "--no-sync", "--locale=C.UTF-8"])
        server.start()
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


class SocketProxy:
    """A unix-socket relay in front of the server that a test can cut: every connection through it is dropped and
    new ones are refused until restore(). libpq reaches it as `host=<its dir>` with the server's port."""

    def __init__(self, server: Server, directory: Path) -> None:
        self.server, self.dir = server, directory
        self.path = directory / f".s.PGSQL.{server.port}"
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.connections = 0
        # Set to some bytes: the next answer from the server that holds them is lost, and its connection dropped
        # (the statement ran, and committed: the client never learns it did).
        self.lose_answer_with: bytes | None = None
        self.answers_lost = 0

    def url(self, database_url: str) -> str:
        return database_url.replace(f"host={self.server.socket_dir}", f"host={self.dir}")

    def restore(self) -> None:
        self.path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        self.path.chmod(0o777)
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones (the socket file is gone: libpq says so at once)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        self.path.unlink(missing_ok=True)
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.server.socket_dir / f".s.PGSQL.{self.server.port}"))
            with self._lock:
                self._open += [client, upstream]
                self.connections += 1
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers and self.lose_answer_with is not None and self.lose_answer_with in data:
                    self.lose_answer_with = None
                    # Read on (the server finishes and commits) but never pass on; then drop both sides.
                    threading.Timer(0.5, self._drop_client, args=(dst, src)).start()
                    while src.recv(65536):
                        pass
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _drop_client(self, client: socket.socket, upstream: socket.socket) -> None:
        self.answers_lost += 1
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
