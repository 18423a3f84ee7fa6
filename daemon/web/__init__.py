"""The web console and HTTP API (`nexus-jobd web`): a process of its own and a client of the store, like the CLI.

NexusCLI's job routes field for field, the CLI's operations, live streams fed by the store's change source, and a
console whose assets ship in this package (static/).
"""
