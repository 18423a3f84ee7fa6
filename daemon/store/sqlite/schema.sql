-- The base schema shared with NexusCLI. Created only where missing: a database NexusCLI made first (with its
-- CHECK constraints, its other tables and its `_migrations`) is used as it is. Never change these columns.

CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    metadata TEXT
);

CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metadata TEXT,
    engine TEXT NOT NULL DEFAULT 'claude',
    FOREIGN KEY (conversation_id) REFERENCES conversations(id) ON DELETE CASCADE
);

CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    conversation_id TEXT,
    message_id TEXT,
    node_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    command TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'executing', 'completed', 'failed', 'cancelled')),
    exit_code INTEGER,
    stdout TEXT,
    stderr TEXT,
    duration INTEGER,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    completed_at INTEGER,
    FOREIGN KEY (conversation_id) REFERENCES conversations(id) ON DELETE SET NULL,
    FOREIGN KEY (message_id) REFERENCES messages(id) ON DELETE SET NULL
);

CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    ip_address TEXT,
    status TEXT NOT NULL CHECK (status IN ('online', 'offline', 'error')),
    capabilities TEXT,
    last_heartbeat INTEGER,
    created_at INTEGER NOT NULL
);

-- Index names are NexusCLI's, so a database it created gets no duplicates.
CREATE INDEX IF NOT EXISTS idx_conversations_updated_at ON conversations(updated_at DESC);
CREATE INDEX IF NOT EXISTS idx_messages_conversation_id ON messages(conversation_id);
CREATE INDEX IF NOT EXISTS idx_messages_created_at ON messages(created_at ASC);
CREATE INDEX IF NOT EXISTS idx_jobs_conversation_id ON jobs(conversation_id);
CREATE INDEX IF NOT EXISTS idx_jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS idx_jobs_created_at ON jobs(created_at DESC);
CREATE INDEX IF NOT EXISTS idx_nodes_status ON nodes(status);

-- The daemon's own bookkeeping: which of its migrations ran (never NexusCLI's `_migrations`).
CREATE TABLE IF NOT EXISTS jobd_migrations (
    name TEXT PRIMARY KEY,
    applied_at INTEGER NOT NULL
);
