"""The named queries of queries.sql, parsed once at import, and the statement splitter for .sql files."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

# SQLite's clock in epoch milliseconds, evaluated once per statement.
NOW_MS = "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)"  # ROUND: the float is x.999...
HERE = Path(__file__).parent  # the package data (schema, queries, migrations) lives beside this module
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def read_sql(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def parse_named(text: str) -> dict[str, str]:
    """`-- name: X` starts query X; its text runs to the next name (comment lines included, harmless)."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"queries.sql: query {name!r} is defined twice")
        queries[name] = body.strip().replace("NOW_MS", NOW_MS)
    return queries


def split_statements(text: str) -> list[str]:
    """Split a script into complete statements (sqlite3 decides where one ends, so ';' in strings is safe)."""
    statements: list[str] = []
    current = ""
    for line in text.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statement = current.strip()
            if statement.strip(";").strip():
                statements.append(statement)
            current = ""
    if current.strip() and not all(ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of the script: {current.strip()[:80]!r}")
    return statements


Q = parse_named(read_sql("queries.sql"))
