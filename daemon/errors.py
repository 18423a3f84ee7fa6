"""The one base exception: every error a user can act on says what was wrong, where, and what to do."""

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
