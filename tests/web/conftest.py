"""The web process (`nexus-jobd web`) as a user starts it, and an HTTP client that talks to it as programs do:
plain http.client over loopback, Server-Sent Events read line by line."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NEXUS_JOBD, Db, wait_for

URL = re.compile(r"nexus-jobd web: open (http://([^/]+)/\?token=(\S+))")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Web:
    """A running `nexus-jobd web`, its login URL, and requests to it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    host: str = ""
    token: str = ""

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None,
                auth: bool = True, raw: bytes | None = None, head_only: bool = False) -> Reply:
        """One request; `head_only`: the status and headers alone (a stream's body never ends)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"Host": self.host, **({"Authorization": f"Bearer {self.token}"} if auth else {})}
        if body is not None:
            raw = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        try:
            conn.request(method, path, body=raw, headers=sent)
            response = conn.getresponse()
            # A stream's body never ends: read, it would hang a test that expected a refusal until its timeout.
            stream = response.getheader("content-type", "").startswith("text/event-stream")
            return Reply(response.status, {k.lower(): v for k, v in response.getheaders()},
                         b"" if head_only or stream else response.read())
        finally:
            conn.close()

    def submit(self, command: str, **fields: Any) -> str:
        reply = self.request("POST", "/api/v1/jobs", {"command": command, **fields})
        assert reply.status == 201, reply.body
        return str(reply.json()["jobId"])

    def events(self, path: str, *, headers: dict[str, str] | None = None, timeout: float = 30) -> Iterator[
            tuple[str | None, dict[str, Any]]]:
        """(id, data) of each event of an SSE stream, until the server ends it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        conn.request("GET", path, headers={"Host": self.host, "Authorization": f"Bearer {self.token}",
                                           "Accept": "text/event-stream", **(headers or {})})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert response.getheader("content-type", "").startswith("text/event-stream")
        event_id: str | None = None
        try:
            while line := response.readline():
                text = line.decode().rstrip("\n")
                if text.startswith("id: "):
                    event_id = text[4:]
                elif text.startswith("data: "):
                    yield event_id, json.loads(text[6:])
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class WebFactory:
    db: Db
    started: list[Web] = field(default_factory=list)

    def __call__(self, config: str = "", *args: str) -> Web:
        home = self.db.path.parent
        n = len(self.started)
        config_path = home / f"web-{n}.toml"
        config_path.write_text(f'[web]\nlisten = "127.0.0.1:9480"\ntoken_file = "{home / "web-token"}"\n{config}')
        log_path = home / f"web-{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_JOBD_")} | {"HOME": str(home)}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([*NEXUS_JOBD, "--db", self.db.target, "--config", str(config_path),
                                     "--log-format", "json", "web", "--listen", "127.0.0.1:0", *args],
                                    stdout=log, stderr=subprocess.STDOUT, env=env)
        web = Web(proc, log_path)
        self.started.append(web)
        found = wait_for(lambda: URL.search(web.log()) or proc.poll() is not None, 20, message="web start-up")
        assert proc.poll() is None, web.log()
        assert isinstance(found, re.Match)
        web.url, web.host, web.token = found.group(1), found.group(2), found.group(3)
        return web


@pytest.fixture
def web_factory(db: Db) -> Iterator[Callable[..., Web]]:
    factory = WebFactory(db)
    yield factory
    for web in factory.started:
        web.stop()


@pytest.fixture
def web(web_factory: Callable[..., Web]) -> Web:
    return web_factory()
