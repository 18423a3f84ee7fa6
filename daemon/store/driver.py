"""The narrow interface a backend gives the job store, as procrastinate's connector gives its JobManager: named
queries run through a few primitives, rows that carry their columns' names, and hooks where the dialects differ.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Protocol, TypeVar

from daemon.errors import DatabaseError
from daemon.model import Claim, Quarantine, RawText
from daemon.store.base import ChangeSource

T = TypeVar("T")
V = TypeVar("V")
Params = Mapping[str, Any]


class Rows(list[Any]):
    """The rows of one statement (tuples, or sqlite3.Row), and the names of its columns, read once per statement:
    a row is picked apart by name without a lookup of its own."""

    __slots__ = ("columns",)

    def __init__(self, rows: Iterable[Any], columns: tuple[str, ...]) -> None:
        list.__init__(self, rows)
        self.columns = columns

    def pick(self, *names: str) -> Callable[[Any], Any]:
        """What takes `names` out of one of these rows: a tuple of their values, or the value for one name. Worked
        out once for each statement's columns, and kept."""
        pick = _PICKS.get((self.columns, names))
        if pick is None:
            pick = _PICKS[(self.columns, names)] = itemgetter(*[self.columns.index(name) for name in names])
        return pick

    def each(self, *names: str) -> Iterator[Any]:
        """Each row's value of `names` (one), or its values of them (a tuple for two or more), in that order."""
        return map(self.pick(*names), self) if self else iter(())

    def column(self, name: str) -> list[Any]:
        return list(self.each(name))

    def tuples(self, *names: str) -> list[tuple[Any, ...]]:
        return list(self.each(*names))

    def first(self, name: str) -> Any:
        """The column `name` of the first row; None without one."""
        return self.pick(name)(self[0]) if self else None

    def filter(self, name: str, keep: Callable[[Any], bool]) -> Rows:
        """The rows whose column `name` `keep` keeps."""
        if not self:
            return self
        value = self.pick(name)
        return Rows([row for row in self if keep(value(row))], self.columns)

    def dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self]


# A few dozen entries: one for each statement's columns and what is asked of them.
_PICKS: dict[tuple[tuple[str, ...], tuple[str, ...]], Callable[[Any], Any]] = {}
_PICKERS: dict[tuple[type[Any], tuple[str, ...]], Callable[[Any], tuple[Any, ...]]] = {}


def values(cls: type[V], rows: Rows) -> list[V]:
    """Each row as a `cls` (a dataclass of daemon.model), its fields taken from the columns of the same names; the
    statement may leave out trailing fields that have defaults. Which column is which is worked out once for each
    statement's columns and kept, so a row costs one C-level pick and the dataclass's constructor."""
    if not rows:
        return []
    pick = _PICKERS.get((cls, rows.columns))
    if pick is None:
        pick = _PICKERS[(cls, rows.columns)] = _picker(cls, rows.columns)
    return [cls(*pick(row)) for row in rows]


def _picker(cls: type[Any], columns: tuple[str, ...]) -> Callable[[Any], tuple[Any, ...]]:
    fields = dataclasses.fields(cls)
    names = [field.name for field in fields if field.name in columns]
    left_out = fields[len(names):]
    if not names or [field.name for field in fields[:len(names)]] != names or any(
            field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
            for field in left_out):
        raise TypeError(f"columns {columns} do not give {cls.__name__}'s fields in order")
    at = [columns.index(name) for name in names]
    if at == list(range(at[0], at[0] + len(at))):  # the fields are a run of columns (the usual case): one slice
        return itemgetter(slice(at[0], at[0] + len(at)))
    return itemgetter(*at) if len(at) > 1 else lambda row: (row[at[0]],)


class Tx(Protocol):
    """Named statements inside one of the driver's transactions."""

    async def rows(self, query: str, params: Params | None = None) -> Rows: ...

    async def execute(self, query: str, params: Params | None = None) -> None: ...

    async def executemany(self, query: str, params: Sequence[Params]) -> None: ...


class Driver(abc.ABC):
    """A backend: its named queries run through a few primitives, how it binds what the dialects bind differently,
    and what only it has (schema, backups, the change source; SQLite's rewrite guard). The job store holds every
    domain operation and asks the driver for nothing else."""

    name: str  # the database as a user names it (a path, or a URL without its password), for messages
    path: Path | None = None  # the database file, for a backend that has one
    read_only = False  # opened read-only (a command that only reads, or a file this user may not write)
    write_denied: str | None = None  # why this user may not write it, when that is why it was opened read-only
    read_only_fs: Path | None = None  # the mount point, when that is why: its filesystem is mounted read-only
    # Daemons on other hosts share it: they may recover this host's jobs, and cannot kill what runs here.
    shared_by_hosts = False
    # What a job's output text becomes to be written, where the backend cannot take any text (None: as it is).
    text: Callable[[str], str] | None = None

    # -- the primitives: each names a query of the backend's queries.sql --------------------------------------

    @abc.abstractmethod
    async def read(self, query: str, params: Params | None = None) -> Rows: ...

    @abc.abstractmethod
    async def write(self, query: str, params: Params | None = None) -> Rows:
        """One statement that writes, in a transaction of its own; the rows it returns."""

    @abc.abstractmethod
    async def write_count(self, query: str, params: Params) -> int:
        """One statement that writes, in a transaction of its own; how many rows it changed."""

    @abc.abstractmethod
    async def transaction(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """`work` in one transaction, retried whole where the backend retries (so it must be safe to run again)."""

    # -- binding: what the dialects take differently ------------------------------------------------------------

    @abc.abstractmethod
    def array(self, items: Iterable[Any]) -> Any:
        """A list parameter (`:nodes`, `:ids`...)."""

    @abc.abstractmethod
    def claims(self, claims: Sequence[Claim]) -> dict[str, Any]:
        """The parameters that name several claims (unfinished_claims, finished_claims)."""

    def key(self, value: str | RawText | None) -> Any:
        """A job's id (or a node's) as read from a row, bound to find that row again."""
        return value


    # -- what the backend notes of the store's writes ------------------------------------------------------

    def touched(self, job_ids: Iterable[Any]) -> None:  # noqa: B027 -- only SQLite keeps count
        """The jobs a write just changed."""

    async def finished(self, tx: Tx, params: Sequence[dict[str, Any]], rows: Rows) -> None:  # noqa: B027
        """Inside finish_many's transaction, once its writes are done: `params` of each finish, `rows` of the
        finished_claims that took."""

    # -- lifecycle, schema ------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def migrate(self) -> list[str]: ...

    @abc.abstractmethod
    async def check(self) -> list[str]: ...

    @abc.abstractmethod
    async def backup(self, target: Path) -> None: ...

    @abc.abstractmethod
    def changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource: ...

    @abc.abstractmethod
    def row_changes(self, on_change: Callable[[], None], *, poll_s: float) -> ChangeSource:
        """Like `changes`, but for every change of a job or node row (output, status, heartbeats), by anyone."""

    # -- another program rewriting the file: only SQLite's can be --------------------------------------------

    @property
    def unwritable(self) -> str | None:
        """Why nothing more may be written to the store (another program rewrote its file), or None."""
        return None

    async def quarantine(self, *, running: Sequence[Mapping[str, Any]], worker: Mapping[str, Any]) -> Quarantine:
        """Stop writing to a file another program rewrote, set our writes aside, and report: which attempts were
        `running` ({id, attempt, node_id, started_at, pid, pid_start}) under `worker` (its lease identity), for
        the next daemon to find them again."""
        raise DatabaseError(f"{self.name}: only a SQLite file can be rewritten by another program")

    def keep_results(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """After quarantine: results of attempts that ended since, kept beside the file (OSError if they cannot)."""
        raise DatabaseError(f"{self.name}: only a SQLite file can be rewritten by another program")

    async def apply_set_aside(self) -> list[dict[str, Any]]:
        """At start-up: what daemons kept beside the file when another program rewrote it, applied to the file as
        it is now (results recorded, claims of attempts that may still run restored for recovery). What was done,
        one entry per job."""
        return []

    def writes_settled(self) -> bool:
        """Would all that was written so far survive another program rewriting the file (it is in the main file,
        not only in a WAL)? Until then, what ran is kept where it ran (the keeper, the node's spool)."""
        return True

    async def idle(self) -> None:  # noqa: B027 -- a no-op unless the backend keeps something for later
        """The daemon is idle, or has just written big rows: give back what the driver holds (memory), and settle
        what was written (writes_settled)."""
