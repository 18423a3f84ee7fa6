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
    ('[daemon]\nmax_concurrent = "8"\n', "[daemon] max_concurrent", "expected an integer >= 1"),
    ("[daemon]\nmax_concurrent = 0\n", "[daemon] max_concurrent", "expected an integer >= 1"),
    ("[daemon]\nmax_concurrent = true\n", "[daemon] max_concurrent", "expected an integer >= 1"),
    ("[daemon]\nmax_concurrent = 2.0\n", "[daemon] max_concurrent", "expected an integer >= 1"),
    ("[daemon]\nflush_interval_ms = 5\n", "[daemon] flush_interval_ms", "expected an integer >= 10"),
    ("[daemon]\noutput_cap_bytes = 1000\n", "[daemon] output_cap_bytes", "expected an integer >= 1024"),
    ("[database]\nbusy_timeout_ms = -1\n", "[database] busy_timeout_ms", "expected an integer >= 0"),
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
    ("[nodes.localhost]\nmax_concurrent = 0\n", "[nodes.localhost] max_concurrent", "expected an integer >= 1"),
    ('[nodes.localhost]\ntools = ["bash", "perl"]\n', "[nodes.localhost] tools",
     "a non-empty list drawn from bash, git"),
    ("[nodes]\nlocalhost = 1\n", "[nodes] localhost", "expected a table [nodes.localhost]"),
    ("[nodes.other]\nmax_concurrent = 1\n", "[nodes.other] host", "the SSH host of node 'other'"),
    ("[nodes.other]\nhost = 'h'\npassword = 'x'\n", "[nodes.other] password", "no password in the config"),
    ("[nodes.other]\nhost = 'h'\nkey = '/no/such/key'\n", "[nodes.other] key", "a readable private key file"),
    ("[nodes.other]\nhost = 'h'\nport = 'ssh'\n", "[nodes.other] port", "an integer >= 1"),
    ('[daemon]\nlocal_node = "phone"\n[nodes.localhost]\n', "[nodes.localhost] host",
     "the local one, 'phone', is reached over SSH"),
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


def test_importing_the_daemon_does_not_import_asyncssh() -> None:
    """asyncssh costs ~18 MB of RSS: only a config with an SSH node may load it."""
    import subprocess
    import sys

    code = "import sys, daemon.cli, daemon.service, daemon.dispatch; print('asyncssh' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
