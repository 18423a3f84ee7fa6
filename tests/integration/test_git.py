"""git jobs against real repositories (a bare repository on disk as the remote), credential prompts that must
not hang, and the per-node tool policy."""

from __future__ import annotations

import http.server
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Daemon, Db


def git(*args: str, cwd: Path | None = None) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(cwd or Path.cwd()), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare repository with one commit, and a working copy that can push more."""
    bare = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "upstream"
    git("clone", "-q", str(bare), str(work))
    (work / "README").write_text("one\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    return bare


def test_clone_pull_status_log_and_a_failing_command(daemon: Daemon, db: Db, remote: Path, tmp_path: Path) -> None:
    clone = db.wait_status(db.insert(f"clone --progress {remote} checkout", tool="git", cwd=str(tmp_path)))
    assert clone["status"] == "completed", clone
    assert "Cloning into 'checkout'" in clone["stderr"]  # progress goes to stderr, and is kept
    checkout = tmp_path / "checkout"

    upstream = tmp_path / "upstream"
    (upstream / "README").write_text("two\n")
    git("commit", "-q", "-am", "two", cwd=upstream)
    git("push", "-q", "origin", "HEAD:main", cwd=upstream)
    head = git("rev-parse", "HEAD", cwd=upstream).strip()

    pull = db.wait_status(db.insert(f"-C {checkout} pull --ff-only", tool="git", cwd=str(tmp_path)))
    assert pull["status"] == "completed", pull
    log = db.wait_status(db.insert("log -1 --format=%H", tool="git", cwd=str(checkout)))
    assert log["stdout"].strip() == head
    (checkout / "new-file").write_text("x")
    status = db.wait_status(db.insert("git status --porcelain", tool="git", cwd=str(checkout)))
    assert status["stdout"] == "?? new-file\n"
    failing = db.wait_status(db.insert("rev-parse --verify no-such-branch", tool="git", cwd=str(checkout)))
    assert (failing["status"], failing["exit_code"]) == ("failed", 128)
    assert "Needed a single revision" in failing["stderr"]


class _AuthRequired(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="private"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def private_http_remote() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthRequired)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/private.git"
    server.shutdown()


def test_a_clone_that_needs_credentials_fails_fast_instead_of_hanging(
        daemon: Daemon, db: Db, private_http_remote: str, tmp_path: Path) -> None:
    started = time.monotonic()
    row = db.wait_status(db.insert(f"clone {private_http_remote} private", tool="git", cwd=str(tmp_path)),
                         timeout=30)
    assert time.monotonic() - started < 10
    assert (row["status"], row["exit_code"]) == ("failed", 128)
    assert "terminal prompts disabled" in row["stderr"]


def test_node_tool_list_decides_what_may_run(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config='[nodes.localhost]\ntools = ["bash"]\n').start()
    row = db.wait_status(db.insert("--version", tool="git"))
    assert (row["status"], row["error"]) == ("failed", "unknown tool 'git'; node 'localhost' runs: bash")
    assert db.wait_status(db.insert("echo still fine"))["status"] == "completed"


def test_allowed_commands_patterns_for_bash(db: Db, daemon_factory: Callable[..., Daemon]) -> None:
    daemon_factory(config="[nodes.localhost]\nallowed_commands = ['echo [a-z]+', 'make( test)?']\n").start()
    assert db.wait_status(db.insert("echo hello"))["stdout"] == "hello\n"
    row = db.wait_status(db.insert("echo hello; rm -rf /tmp/nothing"))
    assert (row["status"], row["exit_code"]) == ("failed", None)
    assert row["error"] == "command is not allowed on node 'localhost': it matches none of its allowed_commands"
