"""SQLite's schema: creating it and applying the daemon's migrations, checking a file against the contract, and
what makes a file unusable before anything is written to it.
"""

from __future__ import annotations

import re
from typing import Any

import aiosqlite

from daemon.store.contract import CONTRACT, check_problems, contract_problems, migrations
from daemon.store.sqlite.queries import HERE, Q, read_sql, split_statements

_ADD_COLUMN = re.compile(r"ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.IGNORECASE)
MIGRATIONS = HERE / "migrations"


async def migrate(conn: aiosqlite.Connection, now_ms: int) -> list[str]:
    """Inside the caller's transaction: the base schema where missing, then each pending migration (a column
    another program added already is left as it is). The names of those applied."""
    applied: list[str] = []
    for statement in split_statements(read_sql("schema.sql")):
        await conn.execute(statement)
    done = await _applied(conn)
    for name, text in migrations(MIGRATIONS):
        if name in done:
            continue
        for statement in split_statements(text):
            if not await _column_exists_for(conn, statement):
                await conn.execute(statement)
        await conn.execute(Q["record_migration"], {"name": name, "now": now_ms})
        applied.append(name)
    return applied


async def _applied(conn: aiosqlite.Connection) -> set[Any]:
    return {row[0] for row in await conn.execute_fetchall(Q["applied_migrations"])}


async def _column_exists_for(conn: aiosqlite.Connection, statement: str) -> bool:
    match = _ADD_COLUMN.search(statement)
    if not match:
        return False
    return match.group(2) in await columns(conn, match.group(1))


async def columns(conn: aiosqlite.Connection, table: str) -> set[str]:
    return {row[1] for row in await conn.execute_fetchall(f"PRAGMA table_info({table})")}


async def check(conn: aiosqlite.Connection) -> list[str]:
    """Problems that would stop the daemon or other programs from using the database; empty when fine."""
    have = {table: found for table in CONTRACT if (found := await columns(conn, table))}
    applied = await _applied(conn) if await columns(conn, "jobd_migrations") else None
    problems = check_problems(have, applied, MIGRATIONS)
    verdict = [row[0] for row in await conn.execute_fetchall("PRAGMA quick_check")]
    if verdict != ["ok"]:
        problems.append(f"integrity: {'; '.join(verdict[:5])}")
    return problems


async def kinds(conn: aiosqlite.Connection) -> dict[str, str]:
    """What each name in the schema is (table, view, index, trigger), names in lower case."""
    return {str(name).lower(): kind for name, kind in await conn.execute_fetchall(Q["schema_objects"])}


async def unusable(conn: aiosqlite.Connection) -> list[str]:
    """Tables of the contract (or the daemon's own) that exist as something else, or lack the contract's
    columns: another program's database, which no migration can fix."""
    found = await kinds(conn)
    have = {table: await columns(conn, table) for table in CONTRACT if found.get(table) == "table"}
    return contract_problems(found, "table", have)


async def not_migrated(conn: aiosqlite.Connection) -> list[str]:
    """What only a writable open (migrate) adds: missing tables, the daemon's pending migrations."""
    found = await kinds(conn)
    problems = []
    if absent := [table for table in CONTRACT if table not in found]:
        problems.append(f"tables {', '.join(absent)} are missing")
    done = await _applied(conn) if found.get("jobd_migrations") == "table" else set()
    if pending := [name for name, _ in migrations(MIGRATIONS) if name not in done]:
        problems.append(f"the daemon's migrations {', '.join(pending)} are not applied (its columns are missing)")
    return problems
