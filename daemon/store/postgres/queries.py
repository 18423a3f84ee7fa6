"""The named queries of the PostgreSQL backend's queries.sql, parsed once at import into psycopg's placeholders."""

from __future__ import annotations

import re
from pathlib import Path

# The database's clock in epoch milliseconds, at the start of the statement: one value however often a statement
# reads it, so `duration = completed_at - started_at` holds exactly.
NOW_MS = "(extract(epoch from statement_timestamp()) * 1000)::bigint"
HERE = Path(__file__).parent
_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # `:name`, never the `::` of a cast


def read_sql(name: str) -> str:
    return (HERE / name).read_text(encoding="utf-8")


def to_psycopg(sql: str) -> str:
    """`:name` -> `%(name)s`, NOW_MS expanded; a literal % (none today) doubled, as psycopg wants."""
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    return _PARAM.sub(r"%(\1)s", code.replace("%", "%%")).replace("NOW_MS", NOW_MS)


def parse_named(text: str) -> dict[str, str]:
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"postgres/queries.sql: query {name!r} is defined twice")
        queries[name] = to_psycopg(body.strip())
    return queries


Q = parse_named(read_sql("queries.sql"))
