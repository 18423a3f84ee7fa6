"""The job keeper: one small process per host and database that spawns the local jobs, is their parent, reads
their output into a capped head and tail, and keeps their exit status until a daemon has recorded it. Jobs
outlive the daemon that started them; the next daemon reattaches (server.py is the process, protocol.py what it and
a daemon say to each other, client.py the daemon's side).

The process and its protocol import nothing outside the standard library (this file neither): the keeper runs with
`python -I -S`, so that it stays a few MiB. Only the daemon imports the client.
"""
