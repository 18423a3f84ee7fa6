"""Who may use the console: a token on every request (even on loopback: on a phone every app can connect to it),
the Host header (DNS rebinding), the origin of state-changing requests (CSRF), and headers that keep a page's
content from running as code (CSP)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from daemon.errors import ConfigError
from daemon.web.views import dumps

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "nexus_jobd_session"
COOKIE_MAX_AGE_S = 30 * 24 * 3600
SAFE_METHODS = (b"GET", b"HEAD", b"OPTIONS")
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
           (b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-resource-policy", b"same-origin")]


def load_token(path: Path) -> str:
    """The token in `path`; a new random one written there (0600, its directory 0700) if the file is missing."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise ConfigError(f"[web] token_file = {str(path)!r}: cannot create it: {e.strerror}; create it yourself "
                              "(one line, a long random token; chmod 600) or point token_file elsewhere") from e
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
        return token
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"[web] token_file = {str(path)!r}: cannot read it: {e}") from e
    if len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"[web] token_file = {str(path)!r}: the token must be one line of at least 16 printable "
                          "ASCII characters without spaces; delete the file to have a new one made")
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"[web] token_file = {str(path)!r}: others may read it (mode "
                          f"{oct(path.stat().st_mode & 0o777)}): chmod 600 {path}")
    return token


def session_value(token: str) -> str:
    """The cookie's value: derived from the token (a new token ends every session), never the token itself."""
    return hmac.new(token.encode(), b"nexus-jobd web session", hashlib.sha256).hexdigest()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    """An IP address (no DNS name to rebind), or a name the console answers to."""
    if not host_header:
        return False
    host = urlsplit(f"//{host_header}").hostname or ""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host.lower() in allowed


class Guard:
    """ASGI middleware in front of every route: Host, login, token or session cookie, CSRF, security headers."""

    def __init__(self, app: ASGIApp, *, token: str, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self._token = token
        self._session = session_value(token)
        self._allowed = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *HEADERS]
            await send(message)

        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(send_secured)
            return
        await self.app(scope, receive, send_secured)

    def _refusal(self, scope: Scope) -> Callable[[Send], Awaitable[None]] | None:
        host = _header(scope, b"host")
        if not host_allowed(host, self._allowed):
            return _reply(403, f"Host {host!r} is not a name of this console: a page of another site may be using "
                               "DNS rebinding to reach it. If the name is yours, add it to [web] allowed_hosts")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if scope["path"] == "/" and "token" in query:
            return self._login(query["token"][0])
        how = self._authenticated(scope)
        if how is None:
            return _unauthorized(scope)
        if how == "cookie" and scope["method"].encode() not in SAFE_METHODS and not _same_origin(scope, host):
            return _reply(403, "cross-site request refused: a request that changes something must come from the "
                               "console's own pages (its Origin header is another site's, or missing)")
        return None

    def _authenticated(self, scope: Scope) -> str | None:
        auth = _header(scope, b"authorization") or ""
        scheme, _, given = auth.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token.encode()):
            return "bearer"
        cookie = SimpleCookie()
        try:
            cookie.load(_header(scope, b"cookie") or "")
        except Exception:  # a malformed Cookie header is no session
            return None
        session = cookie.get(COOKIE)
        if session is not None and hmac.compare_digest(session.value.encode(), self._session.encode()):
            return "cookie"
        return None

    def _login(self, given: str) -> Callable[[Send], Awaitable[None]]:
        """The login URL: a session cookie, and a redirect that takes the token out of the address bar."""
        if not hmac.compare_digest(given.encode(), self._token.encode()):
            return _reply(401, "wrong token: open the login URL that `nexus-jobd web` printed (or `nexus-jobd web "
                               "--url` prints)")
        cookie = (f"{COOKIE}={self._session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={COOKIE_MAX_AGE_S}")

        async def reply(send: Send) -> None:
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                    (b"cache-control", b"no-store"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})

        return reply


def _same_origin(scope: Scope, host: str | None) -> bool:
    """The request's Origin (or, without one, its Referer) is this console's own."""
    origin = _header(scope, b"origin") or _header(scope, b"referer")
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and parts.netloc.lower() == (host or "").lower()


def _unauthorized(scope: Scope) -> Callable[[Send], Awaitable[None]]:
    accept = _header(scope, b"accept") or ""
    if scope["method"] == "GET" and "text/html" in accept:
        page = ("<!doctype html><meta charset=utf-8><title>nexus-jobd: log in</title>"
                "<h1>Log in to the nexus-jobd console</h1><p>Open the login URL that <code>nexus-jobd web</code> "
                "printed when it started (<code>http://HOST:PORT/?token=...</code>), or print it again with "
                "<code>nexus-jobd web --url</code>.</p>")
        return _reply(401, page, html=True)
    return _reply(401, "a token is needed: send `Authorization: Bearer TOKEN` (the token is in [web] token_file), "
                       "or open the login URL in a browser")


def _reply(status: int, message: str, *, html: bool = False) -> Callable[[Send], Awaitable[None]]:
    body = message.encode() if html else dumps({"error": message})
    kind = b"text/html; charset=utf-8" if html else b"application/json"

    async def reply(send: Send) -> None:
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()),
                   (b"cache-control", b"no-store")]
        if status == 401 and not html:
            headers.append((b"www-authenticate", b'Bearer realm="nexus-jobd"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return reply
