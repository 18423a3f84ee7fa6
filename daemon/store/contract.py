"""The tables both backends check a database against: the contract's columns that NexusCLI and other programs rely
on, the daemon's own tables and migrations, and how each backend's `check` and opening word what is wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

CONTRACT = {
    "jobs": ("id", "conversation_id", "message_id", "node_id", "tool", "command", "status", "exit_code",
             "stdout", "stderr", "duration", "created_at", "started_at", "completed_at"),
    "nodes": ("id", "hostname", "ip_address", "status", "capabilities", "last_heartbeat", "created_at"),
    "conversations": ("id", "title", "created_at", "updated_at", "metadata"),
    "messages": ("id", "conversation_id", "role", "content", "created_at", "metadata"),
}
TABLES = (*CONTRACT, "jobd_migrations", "jobd_workers")  # the contract's and the daemon's own


def migrations(folder: Path) -> list[tuple[str, str]]:
    """(name, SQL) of each of a backend's migrations, in the order they apply."""
    return [(path.stem, path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.sql"))]


def lacking(have: Mapping[str, set[str]]) -> list[str]:
    """Tables of the contract in `have` (table -> its columns) without all of the contract's columns."""
    return [f"table {table!r} lacks the contract's columns {', '.join(missing)}"
            for table, columns in CONTRACT.items()
            if table in have and (missing := [c for c in columns if c not in have[table]])]


def contract_problems(kinds: Mapping[str, str], table_kind: str, have: Mapping[str, set[str]]) -> list[str]:
    """What no migration can fix, so that opening refuses the database: a table of the contract or the daemon's
    that is something else (`kinds`: name -> what it is; `table_kind`: the backend's word for a table), or one
    that lacks the contract's columns. A missing table is no problem here: migrate creates it."""
    problems = [f"{name!r} is a {kind.lower()}, not a table" for name in TABLES
                if (kind := kinds.get(name, table_kind)) != table_kind]
    return problems + lacking(have)


def check_problems(have: Mapping[str, set[str]], applied: set[str] | None, folder: Path) -> list[str]:
    """`db check`'s findings on either backend: tables missing or lacking the contract's columns, and the daemon's
    migrations in `folder` not `applied` (None: its migrations table is missing)."""
    problems = []
    for table in CONTRACT:
        if table not in have:
            problems.append(f"table {table!r} is missing (run `nexus-jobd db migrate`)")
        else:
            problems += lacking({table: have[table]})
    if applied is None:
        problems.append("the daemon's migrations table is missing (run `nexus-jobd db migrate`)")
    elif pending := [name for name, _ in migrations(folder) if name not in applied]:
        problems.append(f"migrations not applied: {', '.join(pending)} (run `nexus-jobd db migrate`)")
    return problems
