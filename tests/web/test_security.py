"""The console's security requirements, each over real HTTP: a token on every request, the login URL's cookie,
the Host check against DNS rebinding, CSRF, the security headers, the token file, and bad input answered with a
4xx and its reason (never a 500, never a traceback)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import pytest

from tests.conftest import Db, run_cli
from tests.web.conftest import Web

ROUTES = [("GET", "/"), ("GET", "/static/console.js"), ("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"),
          ("GET", "/api/v1/jobs/x"), ("DELETE", "/api/v1/jobs/x"), ("GET", "/api/v1/jobs/x/stream"),
          ("POST", "/api/v1/jobs/x/retry"), ("GET", "/api/v1/nodes"), ("GET", "/api/v1/daemons"),
          ("GET", "/api/v1/stats"), ("GET", "/api/v1/events"), ("GET", "/nothing-here")]


def _cookie(web: Web) -> str:
    reply = web.request("GET", f"/?token={web.token}", auth=False)
    return reply.headers["set-cookie"].split(";")[0]


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_needs_the_token(web: Web, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": web.token},
                    {"Cookie": "nexus_jobd_session=forged"}):
        reply = web.request(method, path, auth=False, headers=headers)
        assert reply.status == 401, (headers, reply.body)
    assert web.request(method, path, head_only=True).status != 401


def test_the_login_url_sets_a_strict_http_only_cookie_and_drops_the_token(web: Web, db: Db) -> None:
    reply = web.request("GET", f"/?token={web.token}", auth=False)
    assert reply.status == 303 and reply.headers["location"] == "/"  # the address bar loses the token
    cookie = reply.headers["set-cookie"]
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
    assert {"httponly", "path", "max-age"} <= attributes and "SameSite=Strict" in cookie
    assert web.token not in cookie  # a value derived from the token, not the token
    assert web.request("GET", "/api/v1/jobs", auth=False, headers={"Cookie": _cookie(web)}).status == 200
    assert web.request("GET", "/?token=wrong-wrong-wrong", auth=False).status == 401
    page = web.request("GET", "/", auth=False, headers={"Accept": "text/html"})
    assert page.status == 401 and b"login URL" in page.body and page.headers["content-type"].startswith("text/html")


def test_a_foreign_host_header_is_refused(web_factory: Callable[..., Web]) -> None:
    web = web_factory('allowed_hosts = ["phone.lan"]\n')
    for host in ("evil.example", f"evil.example:{web.port}", "localhost.evil.example", "attacker.test:80"):
        reply = web.request("GET", "/api/v1/jobs", headers={"Host": host})
        assert reply.status == 403 and "DNS rebinding" in reply.json()["error"], host
    for host in (f"localhost:{web.port}", f"127.0.0.1:{web.port}", f"[::1]:{web.port}", f"phone.lan:{web.port}"):
        assert web.request("GET", "/api/v1/jobs", headers={"Host": host}).status == 200, host


def test_state_changes_with_the_cookie_need_the_consoles_own_origin(web: Web, db: Db) -> None:
    cookie = _cookie(web)
    origin = f"http://{web.host}"
    for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"},
                    {"Referer": "http://evil.example/page"}):
        for method, path in (("POST", "/api/v1/jobs"), ("DELETE", "/api/v1/jobs/x"), ("POST", "/api/v1/jobs/x/retry")):
            reply = web.request(method, path, {"command": "touch /tmp/pwned"}, auth=False,
                                headers={"Cookie": cookie, **headers})
            assert reply.status == 403 and "cross-site" in reply.json()["error"], (headers, method)
    assert db.conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 0
    ok = web.request("POST", "/api/v1/jobs", {"command": "true"}, auth=False, headers={"Cookie": cookie,
                                                                                      "Origin": origin})
    assert ok.status == 201
    # A form cannot send JSON: a body of another type is refused before it is read.
    form = web.request("POST", "/api/v1/jobs", auth=False, raw=b"command=true",
                       headers={"Cookie": cookie, "Origin": origin,
                                "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 415


def test_security_headers_on_every_answer(web: Web) -> None:
    for method, path in [*ROUTES, ("GET", "/api/v1/jobs?limit=x")]:
        for auth in (True, False):
            headers = web.request(method, path, auth=auth, head_only=True).headers
            csp = headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            assert (headers["x-content-type-options"], headers["referrer-policy"], headers["x-frame-options"]) == (
                "nosniff", "no-referrer", "DENY")


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("POST", "/api/v1/jobs", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/v1/jobs", b"[1, 2]", 400, "JSON object"),
    ("POST", "/api/v1/jobs", b"{}", 400, "Command is required"),
    ("POST", "/api/v1/jobs", b'{"command": 5}', 400, "command must be a string"),
    ("POST", "/api/v1/jobs", b'{"command": "echo \\u0000"}', 400, "NUL"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "tool": "rm"}', 400, "tool must be one of"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "timeout": "soon"}', 400, "timeout must be an integer"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "priority": 1e99}', 400, "priority must be an integer"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "env": {"A B": "x"}}', 400, "not a variable name"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "colour": "red"}', 400, "unknown field 'colour'"),
    ("POST", "/api/v1/jobs", b'{"command": "true", "dependsOn": "nope"}', 404, "no job"),
    ("POST", "/api/v1/jobs", b'{"command": "' + b"x" * 200_000 + b'"}', 413, "longer than"),
    ("POST", "/api/v1/jobs", b"[" + b"1," * 600_000 + b"1]", 413, "larger than"),
    ("GET", "/api/v1/jobs/no-such-id", None, 404, "no job"),
    ("GET", "/api/v1/jobs/no-such-id/stream", None, 404, "no job"),
    ("POST", "/api/v1/jobs/no-such-id/retry", None, 404, "no job"),
    ("DELETE", "/api/v1/jobs/no-such-id", None, 404, "no job"),
    ("GET", "/api/v1/jobs?status=running", None, 400, "status must be one of"),
    ("GET", "/api/v1/jobs?limit=0", None, 400, "limit must be"),
    ("GET", "/api/v1/jobs?before=yesterday", None, 400, "not a page cursor"),
    ("GET", "/api/v1/jobs?q=a%00b", None, 400, "NUL"),
    ("GET", "/api/v1/stats?hours=-1", None, 400, "hours must be"),
    ("PUT", "/api/v1/jobs", None, 405, "method not allowed"),
    ("GET", "/api/v2/jobs", None, 404, "no such route"),
])
def test_bad_requests_get_a_4xx_with_the_reason(web: Web, method: str, path: str, body: bytes | None, status: int,
                                                 words: str) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    reply = web.request(method, path, raw=body, headers=headers)
    assert reply.status == status and words in reply.json()["error"], reply.body[:300]
    assert b"Traceback" not in reply.body and b"File \"" not in reply.body


def test_a_bad_last_event_id_is_refused(web: Web) -> None:
    job_id = web.submit("true")
    reply = web.request("GET", f"/api/v1/jobs/{job_id}/stream", headers={"Last-Event-ID": "<script>"})
    assert reply.status == 400 and "Last-Event-ID" in reply.json()["error"]
    assert "Traceback" not in web.log()


def test_the_token_file_is_made_private_or_read_as_provisioned(db: Db, web_factory: Callable[..., Web]) -> None:
    token_file = db.path.parent / "web-token"
    web = web_factory()
    mode = stat.S_IMODE(os.stat(token_file).st_mode)
    assert mode == 0o600 and token_file.read_text().strip() == web.token and len(web.token) >= 32
    web.stop()
    token_file.write_text("provisioned-by-the-service-manager-1234\n")
    assert web_factory().token == "provisioned-by-the-service-manager-1234"
    token_file.chmod(0o644)
    home = db.path.parent
    config = home / "bad.toml"
    config.write_text(f'[web]\ntoken_file = "{token_file}"\n')
    result = run_cli(["--db", db.target, "--config", str(config), "web", "--listen", "127.0.0.1:0"], home, timeout=30)
    assert result.returncode == 2 and "chmod 600" in result.stderr
    url = run_cli(["--db", db.target, "--config", str(home / "web-1.toml"), "web", "--url"], home)
    assert url.returncode == 2  # the same file, still readable by others
    token_file.chmod(0o600)
    url = run_cli(["--db", db.target, "--config", str(home / "web-1.toml"), "web", "--url"], home)
    assert url.stdout.strip() == "http://127.0.0.1:9480/?token=provisioned-by-the-service-manager-1234"


def test_a_bind_beyond_loopback_says_so_in_the_log(db: Db, web_factory: Callable[..., Web]) -> None:
    web = web_factory("", "--listen", "0.0.0.0:0")
    assert web.url.startswith("http://127.0.0.1:")  # the login URL for this host; reachable from others too
    assert '"web.not_loopback"' in web.log()
    quiet = web_factory()
    assert "not_loopback" not in quiet.log()
