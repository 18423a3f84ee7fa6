"""The PostgreSQL backend (daemons on several hosts share one queue): its driver (driver.py), schema and
migrations, and its named queries (queries.sql). Imported only for a postgresql:// URL: the SQLite default never
loads psycopg.
"""
