"""daemon.store.postgres.queries: every name the job store and the PostgreSQL driver use exists, and every query
plans on the real schema."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import STORE, STORE_PARTS, named_queries_used, require

USED = named_queries_used(*STORE_PARTS, STORE / "postgres")


def _queries() -> dict[str, str]:
    try:
        from daemon.store.postgres.queries import Q
    except ImportError:
        require(False, "psycopg not installed (pip install -e '.[postgres]')")
        raise
    return Q


def test_the_names_found_in_the_backend_are_plausible() -> None:
    assert {"claim_jobs", "finish_job", "write_output", "applied_migrations", "record_migration", "fail_orphan",
            "requeue_orphan", "table_kinds", "migration_lock"} <= set(USED)


@pytest.mark.parametrize("name", USED)
def test_every_query_the_backend_uses_exists(name: str) -> None:
    assert name in _queries(), (f"the job store or the PostgreSQL driver uses query {name!r}, which its queries.sql "
                                "does not define")


def test_parameters_become_psycopg_placeholders_and_casts_stay() -> None:
    from daemon.store.postgres.queries import to_psycopg

    assert to_psycopg("SELECT :a::text, x::int FROM t WHERE y = :b -- :c\n") == \
        "SELECT %(a)s::text, x::int FROM t WHERE y = %(b)s -- %(c)s"


@pytest.fixture(scope="module")
def migrated(pg_server: Any) -> Iterator[Any]:
    import anyio
    import psycopg

    from daemon.store import open_store

    url = pg_server.new_database()

    async def migrate() -> None:
        store = await open_store(url)
        await store.migrate()
        assert await store.migrate() == []  # idempotent
        await store.close()

    anyio.run(migrate)
    with psycopg.connect(url, autocommit=True) as conn:
        yield conn


@pytest.mark.parametrize("name", sorted(USED))
def test_every_query_plans_against_the_schema(migrated: Any, name: str) -> None:
    sql = _queries()[name]
    params = dict.fromkeys(re.findall(r"%\((\w+)\)s", sql))
    migrated.execute("EXPLAIN " + sql, params)


def test_a_url_without_the_driver_says_which_extra_to_install(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['psycopg'] = None; from daemon.cli import main; "
            "sys.exit(main(['--db', 'postgresql:///jobs', 'ps']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr.startswith("nexus-jobd: a postgresql:// URL needs the PostgreSQL driver: pip install "
                                    "'nexus-jobd[postgres]'") and "Traceback" not in result.stderr
