"""health.parse_probe: whatever a node prints, capabilities are facts or nulls, never an exception or bad JSON."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import structlog

from daemon import logging as log
from daemon.config import NodeConfig, Overrides, load
from daemon.health import MAX_FACT_CHARS, Health, parse_probe

HONEST = ("os=Linux\narch=aarch64\nkernel=6.1.0\nhostname=pi\ncpus=4\nmem_total_kb=3884400\n"
          "mem_available_kb=2000000\nload=0.52 0.58 0.59\nbash=GNU bash, version 5.2.15\ndocker_engine=24.0.7\n")


def test_an_honest_probe_gives_its_facts() -> None:
    caps = parse_probe(HONEST, 12.34)
    assert (caps["os"], caps["cpus"], caps["mem_total_kb"], caps["load"]) == ("Linux", 4, 3884400, [0.52, 0.58, 0.59])
    assert (caps["tools"], caps["docker_engine"], caps["rtt_ms"]) == ({"bash": "GNU bash, version 5.2.15"}, "24.0.7",
                                                                     12.3)


@pytest.mark.parametrize("line", [
    "load=a b c", "load=nan nan nan", "load=inf 1 1", "load=-1 0 0", "load=1e999 1 1", "load=1 2", "load=",
    "cpus=\u00b2", "cpus=\u0663", "cpus=-4", "cpus=4.0", "cpus=99999999999999999999999999", "cpus=" + "9" * 5000,
    "mem_total_kb=1e5", "mem_available_kb=", "\x00=\x00", "=", "no equals sign at all",
])
def test_a_fact_that_does_not_parse_is_null_and_the_others_stay(line: str) -> None:
    caps = parse_probe(HONEST + line + "\n", 1.0)
    json.dumps(caps, allow_nan=False)  # NexusCLI reads it with JSON.parse: no NaN, no Infinity
    name = line.partition("=")[0]
    if name in ("load", "cpus", "mem_total_kb", "mem_available_kb"):
        assert caps[name] is None
    assert caps["os"] == "Linux"


def test_facts_are_short_and_only_the_probes_own() -> None:
    caps = parse_probe("os=" + "L" * 100_000 + "\nbash=" + "b" * 100_000 + "\nsurprise=1\n" * 1000, 1.0)
    assert len(caps["os"]) == len(caps["tools"]["bash"]) == MAX_FACT_CHARS
    assert "surprise" not in json.dumps(caps)


@pytest.mark.anyio
async def test_a_node_coming_online_is_news_not_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          request: pytest.FixtureRequest) -> None:
    """Before: `nodes check` (and every daemon's first probe) logged `"status": "online"` at level warning."""
    config_path = tmp_path / "config.toml"
    config_path.write_text('[nodes.pi]\nhost = "192.0.2.1"\ninsecure_skip_host_key_check = true\n')
    config = load(Overrides(config_path=str(config_path)), environ={"HOME": str(tmp_path)})
    answers = iter(["not a probe's answer\x00", HONEST])

    async def probe(node: NodeConfig, script: str) -> str:
        if node.id == "pi" and (answer := next(answers)).endswith("\x00"):
            raise OSError("no route to host")
        return HONEST if node.id != "pi" else answer

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    log.configure("info", "json")
    request.addfinalizer(structlog.reset_defaults)
    health = Health(replace(config, nodes={**config.nodes, "pi": replace(config.nodes["pi"], offline_after=1)}),
                    probe)
    await health.probe_all()  # offline
    await health.probe_all()  # back online
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    levels = {e["status"]: e["level"] for e in events if e["event"] == "node.status"}
    assert levels == {"offline": "warning", "online": "info"}, events
