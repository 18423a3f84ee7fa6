"""daemon.config.load: defaults < file < environment < flags, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import TOOLS, Config, NodeConfig, Overrides, load
from daemon.errors import ConfigError


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`~` is the test's directory, so no real user config file is read and expansion is checkable."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_file(path: Path, **environ: str) -> Config:
    return load(Overrides(config_path=str(path)), environ=environ)


def test_defaults_without_a_file(home: Path) -> None:
    config = load(environ={})
    assert config.source == "built-in defaults"
    assert config.db_path == home / ".nexuscli" / "nexuscli.db"
    assert config.local_node == "localhost"
    assert config.node_ids == ("localhost",)
    assert config.nodes["localhost"] == NodeConfig(id="localhost", max_concurrent=8, tools=TOOLS)
    assert config.max_concurrent == 8
    assert config.output_cap_bytes == 4 * 1024 * 1024
    assert (config.log_level, config.log_format) == ("info", "auto")
    assert config.default_cwd == home
    assert config.job_environment == {}


def test_the_default_config_file_is_read_when_present(home: Path) -> None:
    path = home / ".config" / "nexus-jobd" / "config.toml"
    path.parent.mkdir(parents=True)
    path.write_text("[daemon]\nmax_concurrent = 3\n")
    config = load(environ={})
    assert config.max_concurrent == 3
    assert config.source == str(path)


def test_file_values(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path, """
[database]
path = "~/data/jobs.db"
busy_timeout_ms = 0

[daemon]
local_node = "phone"
max_concurrent = 4
flush_interval_ms = 100
output_cap_bytes = 65536
poll_interval_ms = 500
drain_timeout_ms = 0
kill_grace_ms = 1000
shutdown_grace_ms = 2000
default_cwd = "/srv"
log_level = "debug"
log_format = "json"

[nodes.phone]
max_concurrent = 2
tools = ["bash", "git"]
""")
    config = load_file(path, PATH="/usr/bin")
    assert config.source == str(path)
    assert config.db_path == home / "data" / "jobs.db"
    assert config.busy_timeout_ms == 0
    assert config.local_node == "phone"
    assert (config.max_concurrent, config.flush_interval_ms, config.output_cap_bytes) == (4, 100, 65536)
    assert (config.poll_interval_ms, config.drain_timeout_ms) == (500, 0)
    assert (config.kill_grace_ms, config.shutdown_grace_ms) == (1000, 2000)
    assert config.default_cwd == Path("/srv")
    assert (config.log_level, config.log_format) == ("debug", "json")
    assert config.nodes == {"phone": NodeConfig(id="phone", max_concurrent=2, tools=("bash", "git"))}
    assert config.job_environment == {"PATH": "/usr/bin"}


def test_local_node_inherits_the_daemon_limit(tmp_path: Path) -> None:
    config = load_file(write(tmp_path, "[daemon]\nmax_concurrent = 5\n[nodes.localhost]\ntools = ['bash']\n"))
    assert config.nodes["localhost"] == NodeConfig(id="localhost", max_concurrent=5, tools=("bash",))


def test_env_db_path_wins_over_the_file(tmp_path: Path, home: Path) -> None:
    path = write(tmp_path, '[database]\npath = "/from/file.db"\n')
    assert load_file(path).db_path == Path("/from/file.db")
    assert load_file(path, NEXUS_JOBD_DB="/from/env.db").db_path == Path("/from/env.db")
    assert load_file(path, NEXUS_JOBD_DB="~/env.db").db_path == home / "env.db"


def test_a_postgresql_url_in_the_file_env_or_flag_names_the_database(tmp_path: Path) -> None:
    url = "postgresql:///jobs?host=/run/postgresql&port=5433&sslmode=disable"
    from_file = load_file(write(tmp_path, f'[database]\npath = "{url}"\n'))
    assert (from_file.db_url, from_file.db_target, from_file.db_name) == (url, url, url)
    assert load_file(write(tmp_path, ""), NEXUS_JOBD_DB="postgres://h/db").db_url == "postgres://h/db"
    flag = load(Overrides(db_path="postgresql://u:secret@db.example:5432/jobs"), environ={})
    assert flag.db_name == "postgresql://u:***@db.example:5432/jobs"  # what logs and messages show
    # A file path given after a URL (the flag wins over the file) is a SQLite file again.
    back = load(Overrides(db_path=str(tmp_path / "x.db")), environ={"NEXUS_JOBD_DB": url})
    assert (back.db_url, back.db_target) == (None, tmp_path / "x.db")


def test_redact_url_hides_passwords_in_userinfo_and_query() -> None:
    from daemon.config import redact_url

    assert redact_url("postgresql://me:pw@h/db?password=pw2&x=1") == "postgresql://me:***@h/db?password=***&x=1"
    assert redact_url("postgresql:///db?host=/s") == "postgresql:///db?host=/s"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u@h/db?sslpassword=S3CRET", "postgresql://u@h/db?sslpassword=***"),
    ("postgresql://u@h/db?sslmode=require&%70assword=S3CRET", "postgresql://u@h/db?sslmode=require&%70assword=***"),
    ("postgres://u:S3CRET@[::1/db", "postgres://u:***@[::1/db"),
    ("postgresql://u:S3%zzCRET@h/db", "postgresql://u:***@h/db"),
    ("postgresql://u:S3/CRET@h/db", "postgresql://u:***@h/db"),  # not valid libpq, but meant as a password
    ("postgresql://u:S3@CRET@[::1]:5/db", "postgresql://u:***@[::1]:5/db"),
])
def test_redact_url_hides_every_password_libpq_takes(url: str, shown: str) -> None:
    from daemon.config import redact_url

    assert redact_url(url) == shown


def test_redact_secrets_takes_a_urls_passwords_out_of_any_text() -> None:
    from daemon.config import redact_secrets

    url = "postgres://u:S3%zzCRET@h/db?sslpassword=K%45Y"
    assert redact_secrets(f'invalid percent-encoded token: "S3%zzCRET" in "{url}"', url) == \
        'invalid percent-encoded token: "***" in "postgres://u:***@h/db?sslpassword=***"'
    assert redact_secrets("the key KEY and K%45Y", url) == "the key *** and ***"  # as given, and as decoded
    assert redact_secrets("nothing secret", "postgresql:///db") == "nothing secret"


def test_env_names_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nmax_concurrent = 2\n")
    config = load(environ={"NEXUS_JOBD_CONFIG": str(path)})
    assert config.max_concurrent == 2
    assert config.source == str(path)


def test_flags_win_over_env_and_file(tmp_path: Path) -> None:
    from_env = write(tmp_path, '[daemon]\nmax_concurrent = 2\nlog_level = "warning"\n', "env.toml")
    from_flag = write(tmp_path, '[daemon]\nmax_concurrent = 6\nlog_level = "warning"\nlog_format = "console"\n',
                      "flag.toml")
    environ = {"NEXUS_JOBD_CONFIG": str(from_env), "NEXUS_JOBD_DB": "/env.db"}

    config = load(Overrides(config_path=str(from_flag), db_path="/flag.db", log_level="error", log_format="json"),
                  environ=environ)
    assert config.max_concurrent == 6
    assert config.source == str(from_flag)
    assert config.db_path == Path("/flag.db")
    assert (config.log_level, config.log_format) == ("error", "json")

    without_flags = load(environ=environ)
    assert (without_flags.max_concurrent, without_flags.db_path) == (2, Path("/env.db"))
    assert (without_flags.log_level, without_flags.log_format) == ("warning", "auto")


@pytest.mark.parametrize(("flags", "message"), [
    (Overrides(log_level="loud"), r"--log-level 'loud': expected one of debug, info, warning, error"),
    (Overrides(log_format="xml"), r"--log-format 'xml': expected one of auto, json, console"),
])
def test_bad_flag_values(flags: Overrides, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags, environ={})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon\nmax_concurrent = 2\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_file(path)
    assert str(path) in str(info.value)
    assert "line 1" in str(info.value)


@pytest.mark.parametrize("via", ["flag", "env"])
def test_an_explicit_config_path_that_does_not_exist(tmp_path: Path, via: str) -> None:
    missing = tmp_path / "nope.toml"
    flags = Overrides(config_path=str(missing)) if via == "flag" else Overrides()
    environ = {"NEXUS_JOBD_CONFIG": str(missing)} if via == "env" else {}
    with pytest.raises(ConfigError, match="cannot read the config file") as info:
        load(flags, environ=environ)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(("toml", "key", "detail"), [
    ('[daemon]\nmax_concurrent = "8"\n', "[daemon] max_concurrent", "expected an integer from 1 to 10000"),
    ("[daemon]\nmax_concurrent = 0\n", "[daemon] max_concurrent", "expected an integer from 1 to 10000"),
    ("[daemon]\nmax_concurrent = true\n", "[daemon] max_concurrent", "expected an integer from 1 to 10000"),
    ("[daemon]\nmax_concurrent = 2.0\n", "[daemon] max_concurrent", "expected an integer from 1 to 10000"),
    ("[daemon]\nflush_interval_ms = 5\n", "[daemon] flush_interval_ms",
     "expected an integer from 10 to 3600000 (an hour)"),
    ("[daemon]\noutput_cap_bytes = 1000\n", "[daemon] output_cap_bytes", "expected an integer from 1024 to 268435456"),
    ("[database]\nbusy_timeout_ms = -1\n", "[database] busy_timeout_ms", "expected an integer from 0 to 3600000"),
    ('[database]\npath = ""\n', "[database] path", "expected a non-empty string"),
    ("[database]\npath = 3\n", "[database] path", "expected a non-empty string"),
    ('[daemon]\nlog_level = "verbose"\n', "[daemon] log_level", "expected one of debug, info, warning, error"),
    ('[daemon]\nlog_format = "xml"\n', "[daemon] log_format", "expected one of auto, json, console"),
    ("daemon = 5\n", "[top level] daemon", "expected a table"),
    ("[daemon]\nmax_concurent = 3\n", "[daemon] unknown key 'max_concurent'", "(did you mean 'max_concurrent'?)"),
    ("[deamon]\nmax_concurrent = 3\n", "[top level] unknown key 'deamon'", "(did you mean 'daemon'?)"),
    ('[database]\npaht = "/x.db"\n', "[database] unknown key 'paht'", "(did you mean 'path'?)"),
    ("[nodes.localhost]\nmax_concurent = 1\n", "[nodes.localhost] unknown key 'max_concurent'",
     "(did you mean 'max_concurrent'?)"),
    ("[nodes.localhost]\nmax_concurrent = 0\n", "[nodes.localhost] max_concurrent",
     "expected an integer from 1 to 10000"),
    ('[nodes.localhost]\ntools = ["bash", "perl"]\n', "[nodes.localhost] tools",
     "a non-empty list drawn from bash, git"),
    ("[nodes]\nlocalhost = 1\n", "[nodes] localhost", "expected a table [nodes.localhost]"),
    ("[nodes.other]\nmax_concurrent = 1\n", "[nodes.other] host", "the SSH host of node 'other'"),
    ("[nodes.other]\nhost = 'h'\npassword = 'x'\n", "[nodes.other] password", "no password in the config"),
    ("[nodes.other]\nhost = 'h'\nkey = '/no/such/key'\n", "[nodes.other] key", "a readable private key file"),
    ("[nodes.other]\nhost = 'h'\nport = 'ssh'\n", "[nodes.other] port", "an integer from 1 to 65535"),
    ('[daemon]\nlocal_node = "phone"\n[nodes.localhost]\n', "[nodes.localhost] host",
     "the local one, 'phone', is reached over SSH"),
    ('[android]\nwake_lock = "on"\n', "[android] wake_lock", "expected one of while-running, always, never"),
    ('[android]\nwakelock = "never"\n', "[android] unknown key 'wakelock'", "(did you mean 'wake_lock'?)"),
])
def test_bad_values_name_the_file_and_the_key(tmp_path: Path, toml: str, key: str, detail: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert key in message
    assert detail in message


def test_unknown_key_without_a_close_match_lists_the_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nzzz = 1\n")
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert "unknown key 'zzz'; known keys:" in message
    assert "did you mean" not in message
    assert "max_concurrent" in message


# Every number has an upper bound, checked when the file is read: a value past it is a typo, and one that does not
# fit SQLite's 64-bit INTEGER (or a C int) used to pass here and kill the daemon later, when jobs came.
TOO_BIG = 99999999999999999999
BOUNDS = [  # (table, key, lowest, highest)
    ("database", "busy_timeout_ms", 0, 3_600_000),
    ("database", "retention_days", 0, 36_500),
    ("daemon", "max_concurrent", 1, 10_000),
    ("daemon", "flush_interval_ms", 10, 3_600_000),
    ("daemon", "output_cap_bytes", 1024, 256 * 1024 * 1024),
    ("daemon", "poll_interval_ms", 10, 3_600_000),
    ("daemon", "drain_timeout_ms", 0, 3_600_000),
    ("daemon", "kill_grace_ms", 0, 3_600_000),
    ("daemon", "shutdown_grace_ms", 0, 86_400_000),
    ("daemon", "default_timeout_ms", 0, 366 * 86_400_000),
    ("daemon", "lease_ttl_ms", 1000, 86_400_000),
    ("daemon", "heartbeat_interval_ms", 100, 86_400_000),
    ("daemon", "retry_backoff_ms", 0, 86_400_000),
    ("daemon", "retry_backoff_max_ms", 0, 366 * 86_400_000),
    ("nodes.localhost", "max_concurrent", 1, 10_000),
    ("nodes.localhost", "offline_after", 1, 1000),
    ("nodes.localhost", "queue_timeout_ms", 0, 366 * 86_400_000),
    ("nodes.localhost.limits", "cpu_seconds", 1, 366 * 86_400),
    ("nodes.localhost.limits", "file_size_bytes", 1, 1 << 50),
    ("nodes.localhost.limits", "processes", 1, 1 << 22),
    ("nodes.localhost.limits", "open_files", 1, 2**31 - 1),
    ("nodes.localhost.limits", "memory_bytes", 1, 1 << 50),
    ("nodes.far", "port", 1, 65535),
    ("nodes.far", "max_sessions", 1, 1000),
    ("nodes.far", "keepalive_interval_ms", 100, 3_600_000),
    ("nodes.far", "keepalive_count_max", 1, 1000),
    ("nodes.far", "connect_timeout_ms", 100, 3_600_000),
    ("nodes.far", "reattach_timeout_ms", 0, 7 * 86_400_000),
    ("android", "wake_lock_release_ms", 0, 86_400_000),
]


def _one_setting(table: str, key: str, value: int) -> str:
    far = '\nhost = "127.0.0.1"\ninsecure_skip_host_key_check = true' if table == "nodes.far" else ""
    return f"[{table}]{far}\n{key} = {value}\n"


@pytest.mark.parametrize(("table", "key", "lowest", "highest"), BOUNDS, ids=[f"{t}.{k}" for t, k, *_ in BOUNDS])
def test_every_number_has_an_upper_bound_named_in_the_error(tmp_path: Path, table: str, key: str, lowest: int,
                                                            highest: int) -> None:
    for value in (lowest, highest):
        load_file(write(tmp_path, _one_setting(table, key, value)))  # the bounds themselves are fine
    for value in (highest + 1, TOO_BIG, lowest - 1):
        path = write(tmp_path, _one_setting(table, key, value))
        with pytest.raises(ConfigError) as info:
            load_file(path)
        assert str(info.value).startswith(f"{path}: [{table}] {key} = {value}: expected an integer from "
                                          f"{lowest} to {highest}"), info.value


def test_every_numeric_setting_is_in_the_bounds_table() -> None:
    """A numeric setting added without a bound would be missed by the test above: every int field of Config,
    NodeConfig and SshTarget and every limit is listed there (or is not read from the file)."""
    import dataclasses

    from daemon.config import LIMITS, AndroidConfig, SshTarget

    listed = {key for _, key, *_ in BOUNDS}
    not_from_the_file = {"watchdog_usec", "limits"}  # systemd's; the limits are checked key by key below
    for cls in (Config, NodeConfig, SshTarget, AndroidConfig):
        for f in dataclasses.fields(cls):
            if "int" in str(f.type) and f.name not in not_from_the_file:
                assert f.name in listed, f"{cls.__name__}.{f.name} has no bound in BOUNDS"
    assert set(LIMITS) <= listed
    assert {"keepalive_interval_ms", "connect_timeout_ms"} <= listed  # read as ms, kept as float seconds


def test_the_longest_timeout_agrees_with_what_a_row_may_ask() -> None:
    """default_timeout_ms applies to rows without one: it may be as long as a row's own timeout_ms, no longer."""
    from daemon.config import YEAR_MS
    from daemon.tools import MAX_TIMEOUT_MS

    assert YEAR_MS == MAX_TIMEOUT_MS


def test_a_ssh_node_without_user_logs_in_as_the_daemons_user(tmp_path: Path) -> None:
    """As ssh(1) does: the user name of the effective uid (asyncssh was handed None and failed with a TypeError)."""
    import os
    import pwd

    config = load_file(write(tmp_path, '[nodes.pi]\nhost = "127.0.0.1"\ninsecure_skip_host_key_check = true\n'))
    assert config.nodes["pi"].ssh is not None
    assert config.nodes["pi"].ssh.user == pwd.getpwuid(os.geteuid()).pw_name
    named = load_file(write(tmp_path, '[nodes.pi]\nhost = "h"\nuser = "builder"\n'
                                      'insecure_skip_host_key_check = true\n'))
    assert named.nodes["pi"].ssh is not None and named.nodes["pi"].ssh.user == "builder"


# A file that is not UTF-8 (saved as Latin-1, say) is a configuration error naming the file and the byte.
LATIN1 = "[daemon]\n# réglages du démon\nmax_concurrent = 2\n".encode("latin-1")


def test_a_config_file_that_is_not_utf8_names_the_file_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(LATIN1)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text: byte 0xe9 at offset 12 (line 2, column 4)"), message
    assert f"save the file as UTF-8 (if it is Latin-1: iconv -f latin1 -t utf-8 < {path} > " in message


@pytest.mark.parametrize(("text", "detail"), [
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),  # tomllib hits the recursion limit
    ('[database]\npath = "/tmp/jobs\\u0000.db"\n', "without NUL characters"),  # stat() would raise ValueError
    ('[daemon]\ndefault_cwd = "/tmp\\u0000"\n', "without NUL characters"),
    ("[nodes.localhost]\nallowed_commands = ['" + "(" * 2000 + ")" * 2000 + "']\n", "nested too deeply"),
    ("[nodes.localhost]\nallowed_commands = ['a{99999999999999999999}']\n", "repetition number is too large"),
])
def test_other_bad_files_are_config_errors_not_crashes(tmp_path: Path, text: str, detail: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: ") and detail in str(info.value)


def test_the_shared_database_hint_names_a_config_file_when_none_was_read(home: Path, tmp_path: Path) -> None:
    """Without a config file the fix must say where the setting goes, not 'in built-in defaults'."""
    from dataclasses import replace

    from daemon.service import check_database_access

    db = tmp_path / "private"
    db.mkdir(mode=0o700)
    (db / "jobs.db").touch(mode=0o600)
    (db / "jobs.db").chmod(0o666)
    config = replace(load(environ={}), db_path=db / "jobs.db")
    assert config.source == "built-in defaults"
    with pytest.raises(ConfigError) as info:
        check_database_access(config)
    message = str(info.value)
    assert "allow_shared_database = true in a config file (~/.config/nexus-jobd/config.toml, or --config) to " \
           "accept the risk" in message, message
    assert "built-in defaults" not in message
    with_file = replace(config, source=str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError, match=f"allow_shared_database = true in {tmp_path / 'c.toml'} to accept"):
        check_database_access(with_file)


def test_a_reload_that_fails_unexpectedly_keeps_the_config_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last resort: whatever a bad file makes the loader raise, SIGHUP's handler logs it and returns (the
    asyncio signal callback must not raise: the reload would be lost with only a traceback to show for it)."""
    import structlog

    from daemon import config as config_module
    from daemon.service import _Reloader

    config = load_file(write(tmp_path, "[daemon]\nmax_concurrent = 2\n"))

    def broken(*args: object, **kwargs: object) -> Config:
        raise ValueError("embedded null byte")

    monkeypatch.setattr(config_module, "load", broken)
    reloader = _Reloader(config, Overrides(config_path=config.source), dispatcher=None)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        reloader()
    assert reloader.config is config
    failed = [e for e in logs if e["event"] == "config.reload_failed"]
    assert len(failed) == 1 and failed[0]["error"] == "ValueError: embedded null byte"
    assert failed[0]["kept"] == config.source


def test_on_stop_and_reattach_timeout_default_and_are_checked(tmp_path: Path) -> None:
    config = load_file(write(tmp_path, '[nodes.far]\nhost = "127.0.0.1"\ninsecure_skip_host_key_check = true\n'))
    far = config.nodes["far"].ssh
    assert config.on_stop == "detach" and far is not None and far.reattach_timeout_ms == 3_600_000
    assert load_file(write(tmp_path, '[daemon]\non_stop = "drain"\n')).on_stop == "drain"
    path = write(tmp_path, '[daemon]\non_stop = "kill"\n')
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: [daemon] on_stop = 'kill': expected one of detach, drain")


NODE = '[nodes.pi]\nhost = "pi.lan"\nknown_hosts = "/dev/null"\n'


@pytest.mark.parametrize("value", ["~", "~/jobs", "/srv/jobs", "/"])
def test_an_ssh_nodes_default_cwd_is_the_nodes_own_path_unexpanded(tmp_path: Path, value: str) -> None:
    config = load_file(write(tmp_path, NODE + f'default_cwd = "{value}"\n'))
    assert config.nodes["pi"].default_cwd == value  # `~` is the node user's home: expanded there, not here
    assert load_file(write(tmp_path, NODE)).nodes["pi"].default_cwd is None


@pytest.mark.parametrize(("text", "detail"), [
    (NODE + 'default_cwd = "jobs"\n', "an absolute path ('/srv/jobs') or one under its user's home ('~' or"),
    (NODE + 'default_cwd = "~other/jobs"\n', "an absolute path"),
    (NODE + 'default_cwd = "/srv\\njobs"\n', "on one line"),
    (NODE + 'default_cwd = ""\n', "a non-empty string"),
    (NODE + "default_cwd = 3\n", "a non-empty string"),
    ('[nodes.localhost]\ndefault_cwd = "/srv"\n', "its jobs run in [daemon] default_cwd; set it there"),
])
def test_a_bad_node_default_cwd_names_the_node_and_the_fix(tmp_path: Path, text: str, detail: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: [nodes.") and "default_cwd" in str(info.value)
    assert detail in str(info.value), str(info.value)


@pytest.mark.parametrize("value", ["mysql://x@y/z", "PostgreSQL://u@h/db", "postgresql+psycopg://u@h/db",
                                   " postgresql://u@h/db", "sqlite:///tmp/x.db", "file:///tmp/x.db"])
@pytest.mark.parametrize("via", ["flag", "env", "file"])
def test_a_url_of_another_kind_is_refused_not_taken_for_a_file(tmp_path: Path, value: str, via: str) -> None:
    """Before: each became a SQLite path (`./mysql:/x@y/z`), created and served empty, silently."""
    flags = Overrides(db_path=value) if via == "flag" else Overrides()
    environ = {"NEXUS_JOBD_DB": value} if via == "env" else {}
    if via == "file":
        flags = Overrides(config_path=str(write(tmp_path, f'[database]\npath = "{value}"\n')))
    with pytest.raises(ConfigError) as info:
        load(flags, environ=environ)
    message = str(info.value)
    where = {"flag": "--db", "env": "NEXUS_JOBD_DB", "file": f"{tmp_path / 'config.toml'}: [database] path"}[via]
    assert message.startswith(where), message
    assert "postgresql://" in message and "postgres://" in message and "SQLite file" in message, message
    scheme = value.strip().split("://")[0]
    assert f"{scheme}://" in message, message


@pytest.mark.parametrize(("value", "hint"), [
    ("PostgreSQL://u@h/db", "lowercase"), ("postgresql+psycopg://u@h/db", "+psycopg"),
    (" postgresql://u@h/db", "space"), ("mysql://u:secret@h/db", "./mysql://"),
])
def test_the_refusal_says_what_to_change(value: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(Overrides(db_path=value), environ={})
    assert hint in str(info.value) and "secret" not in str(info.value), str(info.value)


def test_a_path_with_a_colon_and_slashes_that_is_no_url_is_a_file(tmp_path: Path) -> None:
    assert load(Overrides(db_path="./a://b"), environ={}).db_path == Path("a:/b")
    assert load(Overrides(db_path="/srv/x://y.db"), environ={}).db_url is None


@pytest.mark.parametrize("name", ["NEXUS_JOBD_DB", "NEXUS_JOBD_CONFIG"])
def test_an_empty_variable_is_refused_as_the_empty_flag_is(name: str) -> None:
    """Before: NEXUS_JOBD_DB='' silently used the default database, while --db '' is refused."""
    with pytest.raises(ConfigError, match=f"{name} is set but empty") as info:
        load(environ={name: " "})
    assert "unset it" in str(info.value)


@pytest.mark.parametrize(("environ", "termux"), [
    ({"TERMUX_VERSION": "0.118.1", "PREFIX": "/usr"}, True),  # a Termux session
    ({"PREFIX": "/data/data/com.termux/files/usr"}, True),  # a service its runit started, without TERMUX_VERSION
    ({"PREFIX": "/usr/local"}, False),
    ({"TERMUX_VERSION": ""}, False),
    ({}, False),
])
def test_termux_is_told_from_termux_version_or_a_prefix_under_com_termux(tmp_path: Path, environ: dict[str, str],
                                                                          termux: bool) -> None:
    config = load(environ=environ)
    assert (config.android.termux, config.android.wake_lock) == (termux, "while-running")
    assert config.android.holds_wake_lock == termux
    never = load_file(write(tmp_path, '[android]\nwake_lock = "never"\nwake_lock_release_ms = 0\n'), **environ)
    assert (never.android.wake_lock, never.android.wake_lock_release_ms, never.android.holds_wake_lock) == (
        "never", 0, False)
