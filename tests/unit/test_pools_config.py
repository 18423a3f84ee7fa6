"""[pools.<id>] and node labels in the config: members by list or by labels, and the errors that refuse a pool
(a name a node has, an empty pool, a label no node carries), each naming the file, the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import Config, Overrides, PoolConfig, load
from daemon.errors import ConfigError

NODES = """
[nodes.localhost]
labels = ["docker", "x86_64"]
[nodes.ci-1]
host = "10.0.0.1"
labels = ["docker", "x86_64"]
[nodes.pi]
host = "10.0.0.2"
labels = ["arm"]
"""


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load(Overrides(config_path=str(path)), environ={"HOME": str(tmp_path)})


def test_a_pool_by_labels_has_the_nodes_carrying_all_of_them_and_one_by_list_its_members_in_config_order(
        tmp_path: Path) -> None:
    config = load_text(tmp_path, NODES + '[pools.build]\nlabels = ["docker", "x86_64"]\nmax_concurrent = 5\n'
                       '[pools.any]\nmembers = ["pi", "localhost"]\n')
    assert config.nodes["ci-1"].labels == ("docker", "x86_64")
    assert config.pools == {
        "build": PoolConfig(id="build", members=("localhost", "ci-1"), labels=("docker", "x86_64"), max_concurrent=5),
        "any": PoolConfig(id="any", members=("localhost", "pi"))}
    assert config.served_names == ("localhost", "ci-1", "pi", "build", "any")


@pytest.mark.parametrize(("pool", "message"), [
    ('[pools.pi]\nmembers = ["localhost"]',
     "[pools.pi]: 'pi' is already a node's name ([nodes.pi]); a row's node_id names a node or a pool, so they share "
     "one namespace: rename the pool"),
    ('[pools.localhost]\nlabels = ["arm"]', "'localhost' is already a node's name ([nodes.localhost]"),
    ("[pools.build]\nmembers = []", "[pools.build] members = []: expected at least one node: an empty pool"),
    ('[pools.build]\nlabels = ["arm", "docker"]', "no node has all of them, so the pool is empty"),
    ('[pools.build]\nlabels = ["dokcer"]',
     "[pools.build] labels = ['dokcer']: expected labels some node carries: no node has the label 'dokcer' (labels "
     "in use: arm, docker, x86_64); add it to a node's labels = [...] or fix the name"),
    ('[pools.build]\nmembers = ["ci-9"]', "'ci-9' is no node (nodes: localhost, ci-1, pi); add [nodes.ci-9]"),
    ("[pools.build]\nmax_concurrent = 2", "[pools.build]: neither members and labels; a pool is either members"),
    ('[pools.build]\nmembers = ["pi"]\nlabels = ["arm"]', "[pools.build]: both members and labels"),
    ('[pools.build]\nmembers = ["pi", "pi"]', "expected each name once"),
    ('[pools.build]\nmembers = ["pi"]\nmax_concurrent = 0', "[pools.build] max_concurrent = 0: expected an integer"),
    ('[pools.build]\nmembers = ["pi"]\nmembres = ["pi"]', "[pools.build] unknown key 'membres'"),
    ("[pools]\nbuild = 1", "[pools] build = 1: expected a table [pools.build]"),
])
def test_a_pool_that_cannot_be_is_refused_naming_the_file_the_key_and_the_fix(
        tmp_path: Path, pool: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_text(tmp_path, NODES + pool + "\n")
    assert message in str(refused.value) and str(tmp_path / "config.toml") in str(refused.value)


def test_the_local_node_is_a_name_even_when_the_file_does_not_configure_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'localhost' is already a node's name \(\[nodes.localhost\], the local "):
        load_text(tmp_path, '[pools.localhost]\nmembers = ["localhost"]\n')


def test_labels_must_be_a_list_of_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[nodes.pi\] labels = 'arm': expected a list of names"):
        load_text(tmp_path, '[nodes.pi]\nhost = "h"\nlabels = "arm"\n')
