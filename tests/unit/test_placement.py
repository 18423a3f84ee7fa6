"""Placement of a pool's rows on its members (daemon.dispatch.placement): least loaded first, ties in turn, a tool
only where a member can run it, a retry away from the member that just failed it, never more than the room; and a
row its member refused back in the queue at once."""

from __future__ import annotations

from pathlib import Path

from daemon import outcome
from daemon.config import Config, NodeConfig, PoolConfig
from daemon.dispatch.placement import Member, load_per_cpu, place, pools_served, tools_now, tools_of_pool
from daemon.model import OutputSnapshot, PoolRow

ALL = frozenset({"bash", "git", "docker"})


def members(*specs: tuple[str, int, int]) -> list[Member]:
    """(id, running, limit) each, every tool, no load reported."""
    return [Member(i, limit - running, running, limit, None, ALL) for i, running, limit in specs]


def rows(count: int, tool: str = "bash") -> list[PoolRow]:
    return [PoolRow(seq, tool) for seq in range(count)]


def test_the_least_loaded_member_first_by_running_jobs_against_its_limit() -> None:
    placed = place(rows(3), members(("a", 1, 2), ("b", 1, 4), ("c", 0, 1)), room=3)
    assert placed == [(0, "c"), (1, "b"), (2, "a")]  # 0/1; then 1/4 < 1/2; then a 1/2 and b 2/4 tie: in turn


def test_ties_are_taken_in_turn_and_a_burst_spreads_evenly() -> None:
    assert [m for _, m in place(rows(6), members(("a", 0, 2), ("b", 0, 2), ("c", 0, 2)), room=6)] == \
        ["a", "b", "c", "a", "b", "c"]
    assert place(rows(1), members(("a", 0, 2), ("b", 0, 2), ("c", 0, 2)), room=1, turn=1) == [(0, "b")]


def test_the_heartbeat_load_breaks_a_tie_of_running_jobs() -> None:
    busy, idle = Member("a", 2, 0, 2, 3.5, ALL), Member("b", 2, 0, 2, 0.2, ALL)
    assert place(rows(1), [busy, idle], room=1) == [(0, "b")]


def test_a_tool_goes_only_where_a_member_can_run_it_and_a_row_none_can_take_is_left() -> None:
    plain = Member("a", 4, 0, 4, None, frozenset({"bash"}))
    docker = Member("b", 1, 3, 4, None, ALL)
    placed = place([PoolRow(1, "docker"), PoolRow(2, "docker"), PoolRow(3, "git"), PoolRow(4, "bash")],
                   [plain, docker], room=10)
    assert placed == [(1, "b"), (4, "a")]  # b's one slot to the first docker row; nobody free has git


def test_a_row_tried_before_avoids_its_last_member_while_another_can_take_it() -> None:
    assert place([PoolRow(1, "bash", "a")], members(("a", 0, 4), ("b", 3, 4)), room=1) == [(1, "b")]
    assert place([PoolRow(1, "bash", "a")], members(("a", 0, 4), ("b", 4, 4)), room=1) == [(1, "a")]


def test_never_more_than_the_room_the_pool_and_the_daemon_leave() -> None:
    assert len(place(rows(10), members(("a", 0, 8), ("b", 0, 8)), room=3)) == 3


def test_tools_now_needs_an_answering_engine_for_docker_and_a_probe_for_anything_but_bash() -> None:
    assert tools_now({}) == {"bash"}
    assert tools_now({"tools": {"bash": "5", "git": "2", "docker": "27"}, "docker_engine": None}) == {"bash", "git"}
    assert tools_now({"tools": {"bash": "5", "docker": "27"}, "docker_engine": "27.1"}) == {"bash", "docker"}


def test_load_per_cpu() -> None:
    assert load_per_cpu({"load": [2.0, 1.0, 1.0], "cpus": 4}) == 0.5
    assert load_per_cpu({"load": None, "cpus": 4}) is None


def test_a_pools_tools_are_unknown_while_a_member_was_never_probed_and_are_limited_by_the_nodes_tools() -> None:
    nodes = {"a": NodeConfig(id="a", max_concurrent=1, tools=("bash",)), "b": NodeConfig(id="b", max_concurrent=1)}
    config = Config(source="test", db_path=Path("unused.db"), nodes=nodes,
                    pools={"p": PoolConfig(id="p", members=("a", "b"))})
    probed = {"a": {"tools": {"bash": "5", "git": "2"}}, "b": {"tools": {"bash": "5"}}}
    assert tools_of_pool(config, config.pools["p"], lambda n: probed[n]) == {"bash"}  # a may not run git
    assert tools_of_pool(config, config.pools["p"], lambda n: probed[n] if n == "a" else {}) is None
    assert pools_served(config, lambda n: {}) == {"p": {"members": ["a", "b"], "tools": ["bash", "docker", "git"]}}


def test_a_row_its_member_refused_goes_back_at_once_for_another_member_a_named_nodes_row_waits() -> None:
    out = OutputSnapshot(None, None, 0, 0)
    pooled = outcome.node_unreachable("refused", out, retry_at_ms=5000, pooled=True)
    named = outcome.node_unreachable("refused", out, retry_at_ms=5000)
    assert (pooled.requeue, pooled.uncount, pooled.run_after, pooled.node_retry_at) == (True, True, None, 5000)
    assert (named.requeue, named.uncount, named.run_after, named.node_retry_at) == (True, True, 5000, 5000)
