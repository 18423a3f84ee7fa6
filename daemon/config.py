"""Configuration: TOML file + environment + flags -> one frozen, validated `Config`.

Only this module reads `os.environ` for settings; every error names the file, the key and what is expected.
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from daemon.errors import ConfigError

TOOLS = ("bash", "git", "docker")
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# [nodes.<id>.limits] keys -> (POSIX sh `ulimit` flag, the unit it counts in). Every `sh` a node may have (dash,
# busybox ash, mksh, bash as sh) counts -f in 512-byte blocks and -v in KiB; only interactive bash differs.
LIMITS = {"cpu_seconds": ("-t", 1), "file_size_bytes": ("-f", 512), "processes": ("-u", 1),
          "open_files": ("-n", 1), "memory_bytes": ("-v", 1024)}
# The most each limit may be: the kernel's own ceilings (a pid count, a file descriptor count) or far beyond any
# machine (a year of CPU, a PiB), so a number past it is a typo, not a wish. POSIX sh's ulimit counts in rlim_t.
LIMIT_MAX = {"cpu_seconds": 366 * 24 * 3600, "file_size_bytes": 1 << 50, "processes": 1 << 22,
             "open_files": 2**31 - 1, "memory_bytes": 1 << 50}
# Upper bounds of numeric settings: a value past them is a typo, and a huge one would overflow SQLite (a signed
# 64-bit integer) or a C int later, long after start-up said it was fine.
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS
YEAR_MS = 366 * DAY_MS  # the longest job timeout: the same as tools.MAX_TIMEOUT_MS
MAX_CONCURRENT = 10_000
MAX_RETENTION_DAYS = 36_500
MAX_OUTPUT_CAP_BYTES = 256 * 1024 * 1024  # even all-invalid UTF-8 (3 bytes per byte as U+FFFD) fits SQLite's 1e9
_SPANS = {HOUR_MS: "an hour", DAY_MS: "a day", YEAR_MS: "a year"}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
ON_STOP = ("detach", "drain")
WAKE_LOCK = ("while-running", "always", "never")
DEFAULT_CONFIG_PATH = "~/.config/nexus-jobd/config.toml"
NO_FILE = "built-in defaults"  # Config.source when no config file was read
DEFAULT_DB_PATH = "~/.nexuscli/nexuscli.db"
DEFAULT_WEB_TOKEN_FILE = "~/.config/nexus-jobd/web-token"
# What jobs inherit from the daemon's environment by default: enough to behave like a login, not the daemon's
# secrets (tokens, passwords in variables). A trailing * matches a prefix.
DEFAULT_JOB_ENV = ("PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM", "TMPDIR",
                   "PREFIX", "ANDROID_*", "LD_PRELOAD", "XDG_RUNTIME_DIR")


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    id: str
    max_concurrent: int
    tools: tuple[str, ...] = TOOLS
    docker_host: str | None = None  # DOCKER_HOST for this node's jobs; None: the docker CLI's default
    allowed_commands: tuple[re.Pattern[str], ...] = ()  # bash commands must match one (a convenience, not security)
    ssh: SshTarget | None = None  # None: the local node
    offline_after: int = 3  # missed probes in a row before the node is marked offline (hysteresis)
    limits: Mapping[str, int] = field(default_factory=dict)  # resource limits per job: LIMITS keys -> value
    queue_timeout_ms: int | None = None  # fail jobs that waited this long for an offline node; None: wait
    default_cwd: str | None = None  # SSH nodes: where jobs without a cwd run, on the node; None: the user's home
    labels: tuple[str, ...] = ()  # what kind of node it is, for pools that choose their members by label


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """[pools.<id>]: a name a row's node_id may give instead of a node's; the row runs on one of `members`."""

    id: str
    members: tuple[str, ...]  # node ids, in the config's order of nodes
    labels: tuple[str, ...] = ()  # what chose them, when chosen by label (for messages and listings)
    max_concurrent: int | None = None  # its rows running at once from this daemon, all members together


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    """[metrics]: where Prometheus finds the daemon's metrics. Neither set (the default): no metrics at all."""

    listen: tuple[str, int] | None = None  # (host, port) serving GET /metrics
    textfile: Path | None = None  # a *.prom file for node_exporter's textfile collector, rewritten every 15 s

    @property
    def enabled(self) -> bool:
        return self.listen is not None or self.textfile is not None


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    """[web]: the console and HTTP API (`nexus-jobd web`), a process of its own."""

    listen: tuple[str, int] = ("127.0.0.1", 9480)
    token_file: Path = field(default_factory=lambda: _expand(DEFAULT_WEB_TOKEN_FILE))
    # Host names a browser may use besides localhost and IP addresses (a name that resolves to this machine): any
    # other name in the Host header is refused, so that a site cannot reach the console by DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class AndroidConfig:
    """[android]: what the daemon does on a phone. Off Termux none of it applies."""

    termux: bool = False  # detected: TERMUX_VERSION is set, or $PREFIX lies under com.termux
    wake_lock: str = "while-running"  # Termux's wake lock: while jobs run, from start to stop, or not touched
    wake_lock_release_ms: int = 30000  # "while-running": released this long after the last job ended
    path: str = os.defpath  # the daemon's PATH, where termux-wake-lock and the doctor's tools are looked up
    prefix: str = ""  # $PREFIX: Termux's /data/data/com.termux/files/usr, where termux-services keeps its services

    @property
    def holds_wake_lock(self) -> bool:
        return self.termux and self.wake_lock != "never"


def is_termux(environ: Mapping[str, str]) -> bool:
    """Termux sets TERMUX_VERSION in its sessions; a service started by its runit may lack it, but its $PREFIX is
    the app's (/data/data/com.termux/files/usr)."""
    return bool(environ.get("TERMUX_VERSION")) or "com.termux" in environ.get("PREFIX", "")


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    host: str
    port: int = 22
    user: str  # [nodes.X] user; not set: the daemon's user name (of its effective uid), as ssh(1) does
    key: Path | None = None  # None: the SSH agent
    known_hosts: Path | None = None  # None with insecure_skip_host_key_check only
    max_sessions: int = 10  # channels at once on the one connection (OpenSSH's MaxSessions)
    keepalive_interval_s: float = 5.0
    keepalive_count_max: int = 3
    connect_timeout_s: float = 10.0
    reattach_timeout_ms: int = 3_600_000  # a running job survives the node being unreachable this long


@dataclass(frozen=True, kw_only=True)
class Config:
    source: str  # where the settings came from, for messages
    db_path: Path  # the SQLite file (unused when db_url is set)
    db_url: str | None = None  # a postgresql:// URL (libpq's syntax): daemons on several hosts share its queue
    busy_timeout_ms: int = 5000
    local_node: str = "localhost"
    max_concurrent: int = 8
    flush_interval_ms: int = 250
    output_cap_bytes: int = 4 * 1024 * 1024
    poll_interval_ms: int = 5000
    drain_timeout_ms: int = 2000
    kill_grace_ms: int = 5000
    shutdown_grace_ms: int = 30000
    on_stop: str = "detach"  # SIGTERM: leave jobs running for the next daemon ("detach") or "drain" them
    keeper: bool = True  # local jobs run under the host's job keeper (they outlive the daemon); False: our children
    default_timeout_ms: int | None = None  # None: jobs without timeout_ms run as long as they like
    lease_ttl_ms: int = 15000
    heartbeat_interval_ms: int = 15000
    retry_backoff_ms: int = 1000
    retry_backoff_max_ms: int = 300000
    job_environment: Mapping[str, str] = field(default_factory=dict)  # the allowlisted part of the daemon's
    job_env_allowlist: tuple[str, ...] = DEFAULT_JOB_ENV
    allow_shared_database: bool = False  # accept a database others can write (they could run commands as us)
    retention_days: int = 0  # finished jobs older than this are deleted by the daemon; 0 keeps them
    notify_socket: str | None = None  # systemd's NOTIFY_SOCKET
    watchdog_usec: int | None = None  # systemd's WATCHDOG_USEC, when meant for this process
    default_cwd: Path = field(default_factory=Path.home)
    log_level: str = "info"
    log_format: str = "auto"
    nodes: Mapping[str, NodeConfig] = field(default_factory=dict)
    pools: Mapping[str, PoolConfig] = field(default_factory=dict)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    web: WebConfig = field(default_factory=WebConfig)
    android: AndroidConfig = field(default_factory=AndroidConfig)

    @property
    def db_target(self) -> Path | str:
        """What Store.open takes: the URL, or the file."""
        return self.db_url if self.db_url is not None else self.db_path

    @property
    def db_name(self) -> str:
        """The database for messages and logs: the file, or the URL without its password."""
        return redact_url(self.db_url) if self.db_url is not None else str(self.db_path)

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    @property
    def served_names(self) -> tuple[str, ...]:
        """What a row's node_id may say for this daemon to run it: its nodes' ids and its pools' names."""
        return (*self.nodes, *self.pools)

    @property
    def settings_file(self) -> str:
        """Where a setting goes, for messages: the file read, or where one would be read from."""
        if self.source != NO_FILE:
            return self.source
        return f"a config file ({DEFAULT_CONFIG_PATH}, or --config)"


@dataclass(frozen=True)
class Overrides:
    """Values given on the command line; they win over the environment and the file."""

    config_path: str | None = None
    db_path: str | None = None
    log_level: str | None = None
    log_format: str | None = None


class _Section:
    """Typed reads from one TOML table, with errors that name the file and the dotted key."""

    def __init__(self, source: str, prefix: str, data: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.data = source, prefix, data
        self.used: set[str] = set()

    def error(self, key: str, expected: str, value: object) -> ConfigError:
        return self._err(key, expected, value)

    def patterns(self, key: str) -> tuple[re.Pattern[str], ...]:
        value = self.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._err(key, "a list of regular expressions (strings)", value)
        compiled = []
        for pattern in value:
            try:
                compiled.append(re.compile(pattern, re.DOTALL))
            except re.error as e:
                raise self._err(key, f"valid regular expressions ({e.msg} in {pattern!r:.80})", value) from e
            except RecursionError as e:
                raise self._err(key, f"valid regular expressions (groups nested too deeply in {pattern!r:.80})",
                                value) from e
            except OverflowError as e:
                raise self._err(key, f"valid regular expressions ({e} in {pattern!r:.80})", value) from e
        return tuple(compiled)

    def _err(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.prefix}] {key} = {value!r:.200}: expected {expected}")

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        """Every number has both bounds: one past them is refused here, not by SQLite or a C int much later."""
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            span = f" ({_SPANS[maximum]})" if key.endswith("_ms") and maximum in _SPANS else ""
            raise self._err(key, f"an integer from {minimum} to {maximum}{span}", value)
        return value

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value or (choices and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            raise self._err(key, expected, value)
        if "\0" in value:  # no path, host or name holds one; the OS would refuse it later, far from here
            raise self._err(key, "a string without NUL characters (\\u0000)", value)
        return value

    def string_list(self, key: str, default: tuple[str, ...], *, choices: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(key)
        if value is None:
            return default
        if not choices:
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise self._err(key, "a list of names (a trailing * matches a prefix)", value)
            return tuple(value)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v in choices for v in value):
            raise self._err(key, f"a non-empty list drawn from {', '.join(choices)}", value)
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._err(key, "true or false", value)
        return value

    def table(self, key: str) -> Mapping[str, Any]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self._err(key, "a table", value)
        return value

    def reject_unknown(self) -> None:
        for key in self.data:
            if key not in self.used:
                import difflib  # only on this error path: it is slow to import

                close = difflib.get_close_matches(key, sorted(self.used), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(sorted(self.used))
                raise ConfigError(f"{self.source}: [{self.prefix}] unknown key {key!r}{hint}; known keys: {known}")


def _expand(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))


def _database(config: Config, value: str, where: str) -> Config:
    """A `postgresql://` (or `postgres://`) URL names a PostgreSQL database, taken as libpq takes it; another
    `scheme://` is refused (`where` says where it was given); anything else is the SQLite file."""
    if value.startswith(POSTGRES_SCHEMES):
        return replace(config, db_url=value)
    if match := _URL.match(value):
        raise ConfigError(f"{where} = {redact_url(value)!r:.300}: {match.group(1)}:// is no database nexus-jobd "
                          f"can use{_scheme_hint(value, match.group(1))}; give a postgresql:// (or postgres://) URL "
                          "for PostgreSQL, or the path of a SQLite file")
    return replace(config, db_path=_expand(value), db_url=None)


# What looks like a URL (RFC 3986's scheme, then ://), spaces before it included: a path never starts so.
_URL = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://")


def _scheme_hint(value: str, scheme: str) -> str:
    if value != value.lstrip():
        return " (it starts with a space: remove it)"
    if scheme.lower() in ("postgresql", "postgres"):
        return f" (libpq reads only a lowercase scheme: {scheme.lower()}://)"
    if scheme.lower().startswith(("postgresql+", "postgres+")):
        return (f" ({scheme[scheme.index('+'):]} names a SQLAlchemy driver; libpq's URL has none: "
                f"{scheme[:scheme.index('+')].lower()}://)")
    return f" (a SQLite file whose path starts {scheme}://: write ./{scheme}://...)"


_SECRET_KEYS = ("password", "sslpassword")  # libpq's connection options that hold a secret


def redact_url(url: str) -> str:
    """The URL with its passwords (if any) replaced by `***`: what logs and messages may show."""
    return _passwords(url)[0]


def redact_secrets(text: str, url: str) -> str:
    """`text` (a driver's message, which may quote the URL or a piece of it) without the URL's passwords, as
    written in it or decoded."""
    redacted, secrets = _passwords(url)
    text = text.replace(url, redacted)
    for secret in sorted({form for s in secrets for form in (s, unquote(s)) if form}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _passwords(url: str) -> tuple[str, list[str]]:
    """The URL with each password as `***`, and the passwords as written. Userinfo runs to the last `@` before the
    query (a password with an unencoded `/` or `@` is still one); a query key is taken as libpq takes it,
    percent-decoded (`%70assword` is `password`)."""
    scheme, sep, rest = url.partition("://")
    before, question, query = rest.partition("?")
    userinfo, at, hosts = before.rpartition("@")
    secrets = []
    if at and ":" in userinfo:
        user, secret = userinfo.split(":", 1)
        userinfo = f"{user}:***"
        secrets.append(secret)
    items = []
    for key, eq, value in (item.partition("=") for item in query.split("&")) if question else ():
        if eq and unquote(key) in _SECRET_KEYS:
            secrets.append(value)
            value = "***"
        items.append(f"{key}{eq}{value}")
    return f"{scheme}{sep}{userinfo}{at}{hosts}{question}{'&'.join(items)}", secrets


def _read_file(path: Path) -> dict[str, Any]:
    """The file's TOML; whatever is wrong with the file (unreadable, not UTF-8, not TOML) is a ConfigError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - raw.rfind(b"\n", 0, e.start)
        raise ConfigError(
            f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line}, column {column}) "
            "is not valid UTF-8, and TOML files must be; save the file as UTF-8 (if it is Latin-1: "
            f"iconv -f latin1 -t utf-8 < {path} > {path}.new && mv {path}.new {path})"
        ) from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}; fix the syntax at that line") from e
    except RecursionError as e:
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply; "
                          "flatten them (a config needs no more than a few levels)") from e


def _nodes(source: str, top: _Section, local: str, default_max: int) -> dict[str, NodeConfig]:
    nodes: dict[str, NodeConfig] = {}
    for node_id, data in top.table("nodes").items():
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [nodes] {node_id} = {data!r}: expected a table [nodes.{node_id}]")
        section = _Section(source, f"nodes.{node_id}", data)
        docker_host = section.get("docker_host")
        if docker_host is not None and (not isinstance(docker_host, str) or "://" not in docker_host
                                        or "\0" in docker_host):
            raise section.error("docker_host", "a Docker endpoint like 'unix:///run/docker.sock'", docker_host)
        ssh = _ssh_target(section, node_id, local) if node_id != local else None
        queue_timeout = section.integer("queue_timeout_ms", 0, minimum=0, maximum=YEAR_MS)
        nodes[node_id] = NodeConfig(
            id=node_id,
            max_concurrent=section.integer("max_concurrent", default_max, minimum=1, maximum=MAX_CONCURRENT),
            tools=section.string_list("tools", TOOLS, choices=TOOLS),
            docker_host=docker_host,
            allowed_commands=section.patterns("allowed_commands"),
            ssh=ssh,
            offline_after=section.integer("offline_after", 3, minimum=1, maximum=1000),
            limits=_limits(source, node_id, section.table("limits")),
            queue_timeout_ms=queue_timeout or None,
            default_cwd=_node_default_cwd(section, node_id, local),
            labels=_names(section, "labels"),
        )
        section.reject_unknown()
    nodes.setdefault(local, NodeConfig(id=local, max_concurrent=default_max))
    return nodes


def _names(section: _Section, key: str) -> tuple[str, ...]:
    """A list of names (labels, node ids): non-empty strings, each once."""
    value = section.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() and "\0" not in v for v in value):
        raise section.error(key, 'a list of names, e.g. ["docker", "x86_64"]', value)
    if len(set(value)) != len(value):
        raise section.error(key, "each name once", value)
    return tuple(value)


def _pools(source: str, top: _Section, nodes: Mapping[str, NodeConfig]) -> dict[str, PoolConfig]:
    """[pools.<id>]: a set of nodes by `members` or by `labels` (nodes carrying all of them). A row's node_id names
    a node or a pool, so the two share one namespace."""
    pools: dict[str, PoolConfig] = {}
    for pool_id, data in top.table("pools").items():
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [pools] {pool_id} = {data!r:.200}: expected a table [pools.{pool_id}]")
        section = _Section(source, f"pools.{pool_id}", data)
        if pool_id in nodes:
            raise ConfigError(f"{source}: [pools.{pool_id}]: {pool_id!r} is already a node's name ([nodes.{pool_id}]"
                              f"{'' if pool_id in top.table('nodes') else ', the local node'}); a row's node_id "
                              "names a node or a pool, so they share one namespace: rename the pool")
        members, labels = _members(section, nodes), _names(section, "labels")
        if (members is None) == (not labels):
            raise ConfigError(f"{source}: [pools.{pool_id}]: {'both' if labels else 'neither'} members and labels; "
                              'a pool is either members = ["node", ...] or labels = ["label", ...] (the nodes '
                              "carrying all of them): give one of the two")
        if labels:
            members = _labelled(section, nodes, labels)
        assert members is not None
        limit = section.integer("max_concurrent", 0, minimum=1, maximum=MAX_CONCURRENT)
        pools[pool_id] = PoolConfig(id=pool_id, members=members, labels=labels, max_concurrent=limit or None)
        section.reject_unknown()
    return pools


def _members(section: _Section, nodes: Mapping[str, NodeConfig]) -> tuple[str, ...] | None:
    """[pools.X] members: configured nodes, in the config's order; None when not given."""
    if section.get("members") is None:
        return None
    members = _names(section, "members")
    if not members:
        raise section.error("members", "at least one node: an empty pool could run nothing (its rows would wait "
                            "for ever); list its nodes, or remove the pool", [])
    for member in members:
        if member not in nodes:
            raise section.error("members", f"configured nodes: {member!r} is no node (nodes: {', '.join(nodes)}); "
                                f"add [nodes.{member}] or fix the name", list(members))
    return tuple(node for node in nodes if node in members)


def _labelled(section: _Section, nodes: Mapping[str, NodeConfig], labels: tuple[str, ...]) -> tuple[str, ...]:
    """The nodes carrying every one of `labels`: a label no node carries is a typo, and so is a pool they leave
    empty."""
    carried = {label for node in nodes.values() for label in node.labels}
    for label in labels:
        if label not in carried:
            known = ", ".join(sorted(carried)) or "none: no node has labels"
            raise section.error("labels", f"labels some node carries: no node has the label {label!r} (labels in "
                                f"use: {known}); add it to a node's labels = [...] or fix the name", list(labels))
    members = tuple(node.id for node in nodes.values() if set(labels) <= set(node.labels))
    if not members:
        raise section.error("labels", "labels that some node carries all of: no node has all of them, so the "
                            "pool is empty (its rows would wait for ever); give a node all of them, or name "
                            "fewer", list(labels))
    return members


def _node_default_cwd(section: _Section, node_id: str, local: str) -> str | None:
    """[nodes.X] default_cwd: a directory on the node, absolute or under its user's home (`~/...`); it is not
    expanded or checked here (it is the node's path): a job finds out, exit 127 with the shell's reason."""
    value = section.get("default_cwd")
    if value is None:
        return None
    if node_id == local:
        raise section.error("default_cwd", f"no default_cwd on the local node {local!r}: its jobs run in "
                            "[daemon] default_cwd; set it there", value)
    path = section.string("default_cwd", "")
    if "\n" in path or not (path.startswith("/") or path == "~" or path.startswith("~/")):
        raise section.error("default_cwd", "a directory on the node: an absolute path ('/srv/jobs') or one under "
                            "its user's home ('~' or '~/jobs'), on one line", value)
    return path


def _limits(source: str, node_id: str, data: Mapping[str, Any]) -> dict[str, int]:
    section = _Section(source, f"nodes.{node_id}.limits", data)
    limits = {key: section.integer(key, 0, minimum=1, maximum=LIMIT_MAX[key]) for key in LIMITS
              if section.get(key) is not None}
    section.reject_unknown()
    return limits


def _ssh_target(section: _Section, node_id: str, local: str) -> SshTarget:
    """A node other than the local one is reached over SSH: host keys checked, a key file or the agent."""
    host = section.get("host")
    if not isinstance(host, str) or not host or "\0" in host:
        raise section.error("host", f"the SSH host of node {node_id!r} (every node but the local one, {local!r}, "
                            "is reached over SSH)", host)
    if section.get("password") is not None:
        raise section.error("password", "no password in the config: use a key file (key = ...) or the SSH agent",
                            "...")
    key = section.get("key")
    if key is not None:
        key_path = _expand(section.string("key", ""))
        _check_private_file(section, "key", key_path)
    skip = section.get("insecure_skip_host_key_check")
    if skip not in (None, True, False):
        raise section.error("insecure_skip_host_key_check", "true or false", skip)
    known_hosts = None if skip else _expand(section.string("known_hosts", "~/.ssh/known_hosts"))
    return SshTarget(
        host=host,
        port=section.integer("port", 22, minimum=1, maximum=65535),
        user=section.string("user", "") or _daemon_user(section),
        key=_expand(key) if isinstance(key, str) else None,
        known_hosts=known_hosts,
        max_sessions=section.integer("max_sessions", 10, minimum=1, maximum=1000),
        keepalive_interval_s=section.integer("keepalive_interval_ms", 5000, minimum=100, maximum=HOUR_MS) / 1000,
        keepalive_count_max=section.integer("keepalive_count_max", 3, minimum=1, maximum=1000),
        connect_timeout_s=section.integer("connect_timeout_ms", 10000, minimum=100, maximum=HOUR_MS) / 1000,
        reattach_timeout_ms=section.integer("reattach_timeout_ms", HOUR_MS, minimum=0, maximum=WEEK_MS),
    )


def _metrics(section: _Section) -> MetricsConfig:
    """[metrics] listen = "HOST:PORT" and/or textfile = PATH (a *.prom file node_exporter reads)."""
    listen = section.get("listen")
    textfile = section.get("textfile")
    path = None
    if textfile is not None:
        path = _expand(section.string("textfile", ""))
        if not path.name.endswith(".prom") or path.name == ".prom":
            raise section.error("textfile", "a file name ending in .prom (node_exporter's textfile collector reads "
                                "only *.prom files), e.g. '/var/lib/node_exporter/textfile/nexus-jobd.prom'",
                                textfile)
    section.reject_unknown()
    return MetricsConfig(listen=None if listen is None else _host_port(section, "listen", listen), textfile=path)


def _web(section: _Section) -> WebConfig:
    """[web] listen = "HOST:PORT", token_file = PATH, allowed_hosts = ["name", ...]."""
    listen = section.get("listen")
    hosts = section.string_list("allowed_hosts", ())
    if any(not re.fullmatch(r"[A-Za-z0-9.-]+", h) for h in hosts):
        raise section.error("allowed_hosts", "host names without a port (letters, digits, dots and dashes), e.g. "
                            '["phone.lan"]', list(hosts))
    web = WebConfig(token_file=_expand(section.string("token_file", DEFAULT_WEB_TOKEN_FILE)),
                    allowed_hosts=tuple(h.lower() for h in hosts))
    section.reject_unknown()
    return web if listen is None else replace(web, listen=_listen(section, "listen", listen))


def _android(section: _Section, environ: Mapping[str, str]) -> AndroidConfig:
    """[android] wake_lock and wake_lock_release_ms; whether this is Termux is read from the environment."""
    android = AndroidConfig(termux=is_termux(environ), path=environ.get("PATH", os.defpath),
                            prefix=environ.get("PREFIX", ""),
                            wake_lock=section.string("wake_lock", "while-running", choices=WAKE_LOCK),
                            wake_lock_release_ms=section.integer("wake_lock_release_ms", 30000, minimum=0,
                                                                 maximum=DAY_MS))
    section.reject_unknown()
    return android


def _listen(section: _Section, key: str, value: object) -> tuple[str, int]:
    """"HOST:PORT" where port 0 takes any free port (the login URL printed at start says which)."""
    if isinstance(value, str) and value.endswith(":0"):
        return _host_port(section, key, value[:-1] + "1")[0], 0
    return _host_port(section, key, value)


class _Flag(_Section):
    """A value from the command line, checked as the file's key would be; errors name the flag."""

    def _err(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(f"{key} {value!r:.200}: expected {expected}")


def parse_listen(value: str) -> tuple[str, int]:
    """--listen HOST:PORT, as [web] listen takes it."""
    return _listen(_Flag("command line", "", {}), "--listen", value)


def _host_port(section: _Section, key: str, value: object) -> tuple[str, int]:
    """"HOST:PORT" (an IPv6 address in brackets: "[::1]:9479") -> (host, port), port 1..65535."""
    expected = ('"HOST:PORT" with a port from 1 to 65535, e.g. "127.0.0.1:9479" (this host only), '
                '"0.0.0.0:9479" (every interface) or "[::1]:9479"')
    if not isinstance(value, str) or "\0" in value:
        raise section.error(key, expected, value)
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # an IPv6 address without brackets: where its port starts is a guess
        raise section.error(key, f"{expected}; put an IPv6 address in brackets", value)
    if not host.strip() or not (port.isascii() and port.isdigit() and len(port) <= 5) or not 1 <= int(port) <= 65535:
        raise section.error(key, expected, value)
    return host, int(port)


def _daemon_user(section: _Section) -> str:
    """`user` not set: the name of this process's effective uid, the user ssh(1) would log in as."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError as e:
        raise section.error("user", f"a user name to log in as: this daemon's uid {uid} has no name in the "
                            "user database to default to", None) from e


def _check_private_file(section: _Section, key: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise section.error(key, f"a readable private key file ({e.strerror})", str(path)) from e
    if mode & 0o077:
        raise section.error(key, f"a private key only its owner can read (it is mode {stat.S_IMODE(mode):04o}: "
                            f"chmod 600 {path})", str(path))


def load(overrides: Overrides | None = None, environ: Mapping[str, str] | None = None, *,
         local_node: str | None = None) -> Config:
    """Build the config: built-in defaults < config file < environment < command-line flags.

    `local_node`: the nodes as a daemon whose local node is that one sees them (a reload keeps the running one
    until a restart); the file's own [daemon] local_node is still checked, and reported as `local_node`.
    """
    overrides = overrides or Overrides()
    environ = os.environ if environ is None else environ
    for name in ("NEXUS_JOBD_DB", "NEXUS_JOBD_CONFIG"):  # as --db '' and --config '' are refused
        if name in environ and not environ[name].strip():
            raise ConfigError(f"{name} is set but empty: it names nothing; unset it (unset {name}) for the "
                              "default, or give it a value")
    explicit = overrides.config_path or environ.get("NEXUS_JOBD_CONFIG")
    path = _expand(explicit or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    exists = bool(explicit) or path.exists()
    if exists:
        data = _read_file(path)
    source = str(path) if exists else NO_FILE

    top = _Section(source, "top level", data)
    db = _Section(source, "database", top.table("database"))
    dm = _Section(source, "daemon", top.table("daemon"))

    max_concurrent = dm.integer("max_concurrent", 8, minimum=1, maximum=MAX_CONCURRENT)
    local = dm.string("local_node", "localhost")
    config = Config(
        source=source,
        db_path=_expand(DEFAULT_DB_PATH),
        busy_timeout_ms=db.integer("busy_timeout_ms", 5000, minimum=0, maximum=HOUR_MS),  # SQLite: a C int
        local_node=local,
        max_concurrent=max_concurrent,
        flush_interval_ms=dm.integer("flush_interval_ms", 250, minimum=10, maximum=HOUR_MS),
        output_cap_bytes=dm.integer("output_cap_bytes", 4 * 1024 * 1024, minimum=1024,
                                    maximum=MAX_OUTPUT_CAP_BYTES),
        poll_interval_ms=dm.integer("poll_interval_ms", 5000, minimum=10, maximum=HOUR_MS),
        drain_timeout_ms=dm.integer("drain_timeout_ms", 2000, minimum=0, maximum=HOUR_MS),
        kill_grace_ms=dm.integer("kill_grace_ms", 5000, minimum=0, maximum=HOUR_MS),
        shutdown_grace_ms=dm.integer("shutdown_grace_ms", 30000, minimum=0, maximum=DAY_MS),
        on_stop=dm.string("on_stop", "detach", choices=ON_STOP),
        keeper=dm.boolean("keeper", True),
        default_timeout_ms=dm.integer("default_timeout_ms", 0, minimum=0, maximum=YEAR_MS) or None,
        lease_ttl_ms=dm.integer("lease_ttl_ms", 15000, minimum=1000, maximum=DAY_MS),
        heartbeat_interval_ms=dm.integer("heartbeat_interval_ms", 15000, minimum=100, maximum=DAY_MS),
        retry_backoff_ms=dm.integer("retry_backoff_ms", 1000, minimum=0, maximum=DAY_MS),
        retry_backoff_max_ms=dm.integer("retry_backoff_max_ms", 300000, minimum=0, maximum=YEAR_MS),
        job_environment=_allowed_env(environ, allowlist := dm.string_list("job_env_allowlist", DEFAULT_JOB_ENV)),
        job_env_allowlist=allowlist,
        allow_shared_database=db.boolean("allow_shared_database", False),
        retention_days=db.integer("retention_days", 0, minimum=0, maximum=MAX_RETENTION_DAYS),
        notify_socket=environ.get("NOTIFY_SOCKET") or None,
        watchdog_usec=_watchdog_usec(environ),
        default_cwd=_expand(dm.string("default_cwd", str(Path.home()))),
        log_level=dm.string("log_level", "info", choices=LOG_LEVELS),
        log_format=dm.string("log_format", "auto", choices=LOG_FORMATS),
        nodes=(nodes := _nodes(source, top, local if local_node is None else local_node, max_concurrent)),
        pools=_pools(source, top, nodes),
        metrics=_metrics(_Section(source, "metrics", top.table("metrics"))),
        web=_web(_Section(source, "web", top.table("web"))),
        android=_android(_Section(source, "android", top.table("android")), environ),
    )
    config = _database(config, db.string("path", DEFAULT_DB_PATH), f"{source}: [database] path")
    top.reject_unknown()
    db.reject_unknown()
    dm.reject_unknown()
    return _apply_overrides(config, overrides, environ)


def _allowed_env(environ: Mapping[str, str], allowlist: tuple[str, ...]) -> dict[str, str]:
    exact = {name for name in allowlist if not name.endswith("*")}
    prefixes = tuple(name[:-1] for name in allowlist if name.endswith("*"))
    return {k: v for k, v in environ.items() if k in exact or (prefixes and k.startswith(prefixes))}


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """systemd's watchdog, if it is meant for this process (WATCHDOG_PID, when set, must be ours)."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not (usec.isascii() and usec.isdigit()) or not 0 < int(usec) <= YEAR_MS * 1000 or (
            pid and pid != str(os.getpid())):
        return None
    return int(usec)


def _apply_overrides(config: Config, overrides: Overrides, environ: Mapping[str, str]) -> Config:
    if overrides.db_path:
        config = _database(config, overrides.db_path, "--db")
    elif environ.get("NEXUS_JOBD_DB"):
        config = _database(config, environ["NEXUS_JOBD_DB"], "NEXUS_JOBD_DB")
    if overrides.log_level:
        if overrides.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level {overrides.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        config = replace(config, log_level=overrides.log_level)
    if overrides.log_format:
        if overrides.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format {overrides.log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
        config = replace(config, log_format=overrides.log_format)
    return config
