"""[metrics] in the config: what is accepted, what is refused (naming the file and key), and that nothing of
prometheus_client is imported while [metrics] is not set."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config
from daemon.config import MetricsConfig
from daemon.errors import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.load(config.Overrides(config_path=str(path)), environ={})


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "").metrics == MetricsConfig()
    assert not MetricsConfig().enabled


@pytest.mark.parametrize(("listen", "host", "port"), [
    ("127.0.0.1:9479", "127.0.0.1", 9479),
    ("0.0.0.0:1", "0.0.0.0", 1),
    ("localhost:65535", "localhost", 65535),
    ("[::1]:9479", "::1", 9479),
])
def test_listen_is_host_and_port(tmp_path: Path, listen: str, host: str, port: int) -> None:
    metrics = load(tmp_path, f'[metrics]\nlisten = "{listen}"\n').metrics
    assert (metrics.listen, metrics.textfile, metrics.enabled) == ((host, port), None, True)


@pytest.mark.parametrize("listen", ['"9479"', '":9479"', '"127.0.0.1:"', '"127.0.0.1:0"', '"127.0.0.1:65536"',
                                    '"127.0.0.1:http"', '"::1:9479"', '"[]:9479"', "9479", '"host:0009479"'])
def test_a_bad_listen_names_the_file_and_key(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ConfigError) as error:
        load(tmp_path, f"[metrics]\nlisten = {listen}\n")
    assert str(error.value).startswith(f"{tmp_path / 'config.toml'}: [metrics] listen = ")
    assert '"HOST:PORT" with a port from 1 to 65535' in str(error.value)


def test_textfile_is_a_prom_path(tmp_path: Path) -> None:
    metrics = load(tmp_path, '[metrics]\ntextfile = "~/textfile/nexus-jobd.prom"\n').metrics
    assert metrics.textfile == Path.home() / "textfile" / "nexus-jobd.prom" and metrics.listen is None
    with pytest.raises(ConfigError, match=r"\[metrics\] textfile = '/tmp/metrics.txt': expected a file name ending "
                                          r"in .prom"):
        load(tmp_path, '[metrics]\ntextfile = "/tmp/metrics.txt"\n')


def test_unknown_keys_are_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[metrics\] unknown key 'listen_on' \(did you mean 'listen'\?\)"):
        load(tmp_path, '[metrics]\nlisten_on = "127.0.0.1:9479"\n')


