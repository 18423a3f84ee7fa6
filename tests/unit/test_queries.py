"""daemon.store.sqlite.queries: every name the job store and the SQLite driver use exists, the parser and splitter,
every query prepares on the schema."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from importlib import resources

import pytest

from daemon.store.sqlite.queries import Q, parse_named, read_sql, split_statements
from tests.conftest import STORE, STORE_PARTS, named_queries_used

USED = named_queries_used(*STORE_PARTS, STORE / "sqlite")
PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def test_the_names_found_in_the_store_are_plausible() -> None:
    # Guards the regexes of named_queries_used: if they found nothing, the next test would pass vacuously.
    assert {"claim_jobs", "finish_job", "write_output", "applied_migrations", "record_migration", "fail_orphan",
            "requeue_orphan", "apply_kept_result", "data_version", "requeue_job"} <= set(USED)


@pytest.mark.parametrize("name", USED)
def test_every_query_the_store_uses_exists(name: str) -> None:
    assert name in Q, f"the job store or the SQLite driver uses query {name!r}, which queries.sql does not define"


def test_parse_named_splits_on_name_lines() -> None:
    text = "-- header comment\n-- name: one\n-- what it does\nSELECT 1;\n\n-- name: two\nSELECT 2;\n"
    assert parse_named(text) == {"one": "-- what it does\nSELECT 1;", "two": "SELECT 2;"}


def test_parse_named_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="'one' is defined twice"):
        parse_named("-- name: one\nSELECT 1;\n-- name: two\nSELECT 2;\n-- name: one\nSELECT 3;\n")


def test_split_statements_keeps_semicolons_inside_strings() -> None:
    text = "INSERT INTO t VALUES ('a;b');\nINSERT INTO t VALUES ('c;\nd;');\n"
    assert split_statements(text) == ["INSERT INTO t VALUES ('a;b');", "INSERT INTO t VALUES ('c;\nd;');"]


def test_split_statements_handles_comments() -> None:
    text = ("-- leading; comment\nCREATE TABLE t (a);  -- trailing; comment\n"
            "/* block; comment */\nINSERT INTO t VALUES (1);\n-- a comment at the very end\n")
    statements = split_statements(text)
    assert len(statements) == 2
    assert statements[0].endswith("CREATE TABLE t (a);  -- trailing; comment")
    assert statements[1].endswith("INSERT INTO t VALUES (1);")
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)
    assert conn.execute("SELECT a FROM t").fetchall() == [(1,)]


def test_split_statements_keeps_a_trigger_body_whole() -> None:
    text = ("CREATE TABLE t (a);\nCREATE TRIGGER tr AFTER INSERT ON t BEGIN\n"
            "  UPDATE t SET a = a + 1;\n  UPDATE t SET a = a * 2;\nEND;\n")
    statements = split_statements(text)
    assert len(statements) == 2
    assert statements[1].startswith("CREATE TRIGGER") and statements[1].endswith("END;")


def test_split_statements_skips_empty_statements_and_ends_without_newline() -> None:
    assert split_statements(";\n;;\nSELECT 1;") == ["SELECT 1;"]


def test_split_statements_rejects_an_unterminated_statement() -> None:
    with pytest.raises(ValueError, match="incomplete SQL statement"):
        split_statements("SELECT 1;\nSELECT 2\n")


def test_every_query_is_exactly_one_statement() -> None:
    for name, sql in Q.items():
        assert len(split_statements(sql)) == 1, f"query {name!r} is not a single complete statement"


def schema_statements() -> list[str]:
    statements = split_statements(read_sql("schema.sql"))
    folder = resources.files("daemon.store.sqlite").joinpath("migrations")
    for name in sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql")):
        statements += split_statements(folder.joinpath(name).read_text(encoding="utf-8"))
    return statements


@pytest.fixture(scope="module")
def schema_db() -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in schema_statements():
        conn.execute(statement)
    yield conn
    conn.close()


def test_schema_and_migrations_apply_cleanly(schema_db: sqlite3.Connection) -> None:
    tables = {row[0] for row in schema_db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "jobs", "nodes", "jobd_migrations"} <= tables
    columns = {row[1] for row in schema_db.execute("PRAGMA table_info(jobs)")}
    assert {"error", "cwd", "env", "priority", "stdout_bytes", "stderr_bytes", "worker_id", "attempt"} <= columns


@pytest.mark.parametrize("name", sorted(Q))
def test_every_query_prepares_against_the_schema(schema_db: sqlite3.Connection, name: str) -> None:
    sql = Q[name]
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    params = dict.fromkeys(PARAM.findall(code))
    try:
        schema_db.execute("EXPLAIN " + sql, params).fetchall()
    except sqlite3.Error as e:
        pytest.fail(f"query {name!r} does not prepare: {e}")
