-- The base schema shared with NexusCLI, in PostgreSQL types: the same tables and column names, epoch-millisecond
-- BIGINT timestamps, the same CHECK constraints. Created only where missing. Never change these columns.

CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    metadata TEXT
);

CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    metadata TEXT,
    engine TEXT NOT NULL DEFAULT 'claude'
);

CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    conversation_id TEXT REFERENCES conversations(id) ON DELETE SET NULL,
    message_id TEXT REFERENCES messages(id) ON DELETE SET NULL,
    node_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    command TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued', 'executing', 'completed', 'failed', 'cancelled')),
    exit_code INTEGER,
    stdout TEXT,
    stderr TEXT,
    duration BIGINT,  -- ms; BIGINT (not INTEGER) so that a job may run longer than 24.8 days
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    completed_at BIGINT
);

CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    ip_address TEXT,
    status TEXT NOT NULL CHECK (status IN ('online', 'offline', 'error')),
    capabilities TEXT,
    last_heartbeat BIGINT,
    created_at BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS idx_conversations_updated_at ON conversations(updated_at DESC);
CREATE INDEX IF NOT EXISTS idx_messages_conversation_id ON messages(conversation_id);
CREATE INDEX IF NOT EXISTS idx_messages_created_at ON messages(created_at ASC);
CREATE INDEX IF NOT EXISTS idx_jobs_conversation_id ON jobs(conversation_id);
CREATE INDEX IF NOT EXISTS idx_jobs_status ON jobs(status);
CREATE INDEX IF NOT EXISTS idx_jobs_created_at ON jobs(created_at DESC);
CREATE INDEX IF NOT EXISTS idx_nodes_status ON nodes(status);

-- The daemon's own bookkeeping: which of its migrations ran.
CREATE TABLE IF NOT EXISTS jobd_migrations (
    name TEXT PRIMARY KEY,
    applied_at BIGINT NOT NULL
);
