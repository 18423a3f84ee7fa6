"""The SQLite backend (the embedded default): its driver (driver.py) and how a file is opened (opening.py), its
schema and migrations, its named queries (queries.sql), and what only a file has: the rewrite guard (guard.py), the
reports beside a rewritten file (rewrites.py, setaside.py) and inotify with data_version (wakeup.py). The only
package that imports aiosqlite.
"""
