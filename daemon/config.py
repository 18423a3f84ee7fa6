"""Configuration: TOML file + environment + flags -> one frozen, validated `Config`.

Only this module reads `os.environ` for settings; every error names the file, the key and what is expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daemon.errors import ConfigError

TOOLS = ("bash", "git", "docker")
# [nodes.<id>.limits] keys -> (POSIX sh `ulimit` flag, the unit it counts in). Every `sh` a node may have (dash,
# busybox ash, mksh, bash as sh) counts -f in 512-byte blocks and -v in KiB; only interactive bash differs.
LIMITS = {"cpu_seconds": ("-t", 1), "file_size_bytes": ("-f", 512), "processes": ("-u", 1),
          "open_files": ("-n", 1), "memory_bytes": ("-v", 1024)}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
DEFAULT_CONFIG_PATH = "~/.config/nexus-jobd/config.toml"
DEFAULT_DB_PATH = "~/.nexuscli/nexuscli.db"
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


@dataclass(frozen=True, kw_only=True)
class SshTarget:
    host: str
    port: int = 22
    user: str | None = None  # None: the daemon's user name
    key: Path | None = None  # None: the SSH agent
    known_hosts: Path | None = None  # None with insecure_skip_host_key_check only
    max_sessions: int = 10  # channels at once on the one connection (OpenSSH's MaxSessions)
    keepalive_interval_s: float = 5.0
    keepalive_count_max: int = 3
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, kw_only=True)
class Config:
    source: str  # where the settings came from, for messages
    db_path: Path
    busy_timeout_ms: int = 5000
    local_node: str = "localhost"
    max_concurrent: int = 8
    flush_interval_ms: int = 250
    output_cap_bytes: int = 4 * 1024 * 1024
    poll_interval_ms: int = 5000
    drain_timeout_ms: int = 2000
    kill_grace_ms: int = 5000
    shutdown_grace_ms: int = 30000
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

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self.nodes)


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
        try:
            return tuple(re.compile(v, re.DOTALL) for v in value)
        except re.error as e:
            raise self._err(key, f"valid regular expressions ({e.msg} in {e.pattern!r})", value) from e

    def _err(self, key: str, expected: str, value: object) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.prefix}] {key} = {value!r}: expected {expected}")

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def positive_int(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._err(key, f"an integer >= {minimum}", value)
        return value

    def string(self, key: str, default: str, *, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or not value or (choices and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            raise self._err(key, expected, value)
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


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}; fix the syntax at that line") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e


def _nodes(source: str, top: _Section, local: str, default_max: int) -> dict[str, NodeConfig]:
    nodes: dict[str, NodeConfig] = {}
    for node_id, data in top.table("nodes").items():
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [nodes] {node_id} = {data!r}: expected a table [nodes.{node_id}]")
        section = _Section(source, f"nodes.{node_id}", data)
        docker_host = section.get("docker_host")
        if docker_host is not None and (not isinstance(docker_host, str) or "://" not in docker_host):
            raise section.error("docker_host", "a Docker endpoint like 'unix:///run/docker.sock'", docker_host)
        ssh = _ssh_target(section, node_id, local) if node_id != local else None
        queue_timeout = section.positive_int("queue_timeout_ms", 0, minimum=0)
        nodes[node_id] = NodeConfig(
            id=node_id,
            max_concurrent=section.positive_int("max_concurrent", default_max),
            tools=section.string_list("tools", TOOLS, choices=TOOLS),
            docker_host=docker_host,
            allowed_commands=section.patterns("allowed_commands"),
            ssh=ssh,
            offline_after=section.positive_int("offline_after", 3),
            limits=_limits(source, node_id, section.table("limits")),
            queue_timeout_ms=queue_timeout or None,
        )
        section.reject_unknown()
    nodes.setdefault(local, NodeConfig(id=local, max_concurrent=default_max))
    return nodes


def _limits(source: str, node_id: str, data: Mapping[str, Any]) -> dict[str, int]:
    section = _Section(source, f"nodes.{node_id}.limits", data)
    limits = {key: section.positive_int(key, 0) for key in LIMITS if section.get(key) is not None}
    section.reject_unknown()
    return limits


def _ssh_target(section: _Section, node_id: str, local: str) -> SshTarget:
    """A node other than the local one is reached over SSH: host keys checked, a key file or the agent."""
    host = section.get("host")
    if not isinstance(host, str) or not host:
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
        port=section.positive_int("port", 22),
        user=section.string("user", "") or None,
        key=_expand(key) if isinstance(key, str) else None,
        known_hosts=known_hosts,
        max_sessions=section.positive_int("max_sessions", 10),
        keepalive_interval_s=section.positive_int("keepalive_interval_ms", 5000, minimum=100) / 1000,
        keepalive_count_max=section.positive_int("keepalive_count_max", 3),
        connect_timeout_s=section.positive_int("connect_timeout_ms", 10000, minimum=100) / 1000,
    )


def _check_private_file(section: _Section, key: str, path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise section.error(key, f"a readable private key file ({e.strerror})", str(path)) from e
    if mode & 0o077:
        raise section.error(key, f"a private key only its owner can read (it is {oct(mode & 0o777)}: "
                            f"chmod 600 {path})", str(path))


def load(overrides: Overrides | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the config: built-in defaults < config file < environment < command-line flags."""
    overrides = overrides or Overrides()
    environ = os.environ if environ is None else environ
    explicit = overrides.config_path or environ.get("NEXUS_JOBD_CONFIG")
    path = _expand(explicit or DEFAULT_CONFIG_PATH)
    data: dict[str, Any] = {}
    if explicit or path.exists():
        data = _read_file(path)
    source = str(path) if data or explicit else "built-in defaults"

    top = _Section(source, "top level", data)
    db = _Section(source, "database", top.table("database"))
    dm = _Section(source, "daemon", top.table("daemon"))

    max_concurrent = dm.positive_int("max_concurrent", 8)
    local = dm.string("local_node", "localhost")
    config = Config(
        source=source,
        db_path=_expand(db.string("path", DEFAULT_DB_PATH)),
        busy_timeout_ms=db.positive_int("busy_timeout_ms", 5000, minimum=0),
        local_node=local,
        max_concurrent=max_concurrent,
        flush_interval_ms=dm.positive_int("flush_interval_ms", 250, minimum=10),
        output_cap_bytes=dm.positive_int("output_cap_bytes", 4 * 1024 * 1024, minimum=1024),
        poll_interval_ms=dm.positive_int("poll_interval_ms", 5000, minimum=10),
        drain_timeout_ms=dm.positive_int("drain_timeout_ms", 2000, minimum=0),
        kill_grace_ms=dm.positive_int("kill_grace_ms", 5000, minimum=0),
        shutdown_grace_ms=dm.positive_int("shutdown_grace_ms", 30000, minimum=0),
        default_timeout_ms=dm.positive_int("default_timeout_ms", 0, minimum=0) or None,
        lease_ttl_ms=dm.positive_int("lease_ttl_ms", 15000, minimum=1000),
        heartbeat_interval_ms=dm.positive_int("heartbeat_interval_ms", 15000, minimum=100),
        retry_backoff_ms=dm.positive_int("retry_backoff_ms", 1000, minimum=0),
        retry_backoff_max_ms=dm.positive_int("retry_backoff_max_ms", 300000, minimum=0),
        job_environment=_allowed_env(environ, allowlist := dm.string_list("job_env_allowlist", DEFAULT_JOB_ENV)),
        job_env_allowlist=allowlist,
        allow_shared_database=db.boolean("allow_shared_database", False),
        retention_days=db.positive_int("retention_days", 0, minimum=0),
        notify_socket=environ.get("NOTIFY_SOCKET") or None,
        watchdog_usec=_watchdog_usec(environ),
        default_cwd=_expand(dm.string("default_cwd", str(Path.home()))),
        log_level=dm.string("log_level", "info", choices=LOG_LEVELS),
        log_format=dm.string("log_format", "auto", choices=LOG_FORMATS),
        nodes=_nodes(source, top, local, max_concurrent),
    )
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
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec)


def _apply_overrides(config: Config, overrides: Overrides, environ: Mapping[str, str]) -> Config:
    db_path = overrides.db_path or environ.get("NEXUS_JOBD_DB")
    if db_path:
        config = replace(config, db_path=_expand(db_path))
    if overrides.log_level:
        if overrides.log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level {overrides.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
        config = replace(config, log_level=overrides.log_level)
    if overrides.log_format:
        if overrides.log_format not in LOG_FORMATS:
            raise ConfigError(f"--log-format {overrides.log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
        config = replace(config, log_format=overrides.log_format)
    return config
