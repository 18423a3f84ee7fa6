"""The one base exception: every error a user can act on says what was wrong, where, and what to do; and a
message stays readable however big the values it quotes."""

from __future__ import annotations


class JobdError(Exception):
    """An error with a message meant for the person running nexus-jobd."""


class ConfigError(JobdError):
    """The configuration (file, environment or flags) is invalid; start-up stops."""


class DatabaseError(JobdError):
    """The database cannot be opened, migrated or used as the contract requires."""


class BadJob(JobdError):
    """A row that cannot be run as written; the job fails with this message as its `error`."""


class DatabaseRewritten(DatabaseError):
    """Another program rewrote the database file outside SQLite's locking: nothing of ours may be written to it."""


class WholeFileWriter(DatabaseRewritten):
    """The file is kept by a program that writes it whole (NexusCLI's sql.js): refused before anything is written,
    until someone takes it over (`nexus-jobd db take-over`)."""


def shorten(text: str, limit: int) -> str:
    """`text`, or where it is longer than `limit` (a message quoting a row's 5 MB value), its start and its end
    around its true length: `aaa…(5000001 chars)…z`, `limit` characters in all (so shortening again changes
    nothing: a value shortened where it was made keeps its true length wherever it goes next)."""
    if len(text) <= limit:
        return text
    marker = f"…({len(text)} chars)…"
    room = max(0, limit - len(marker))
    tail = room // 4
    return f"{text[:room - tail]}{marker}{text[len(text) - tail:]}"


class JobLost(Exception):
    """The job can no longer be followed (its node stayed unreachable, its process vanished without an exit
    status, its node sent what does not parse): it did not succeed, whatever it did; the message says why."""


class ConnectionLost(JobLost):
    """The link to the node dropped and did not come back in time while the job ran."""


class SpawnError(Exception):
    """The command could not be started (exit code 127); the message says why."""


class NodeUnreachable(SpawnError):
    """The node did not answer, so nothing was started there: the job waits for the node (it is not a run of the
    command, whatever its max_attempts says). `retry_in_s`: when the node is worth trying again."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s
