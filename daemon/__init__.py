"""nexus-jobd: runs jobs queued as rows of a SQLite `jobs` table, locally or over SSH."""

__version__ = "0.1.0"
