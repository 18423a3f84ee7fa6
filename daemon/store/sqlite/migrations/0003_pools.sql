-- Pools: a row's node_id may name a pool, and the node that runs it is chosen as it is claimed. Where each attempt
-- ran is the daemon's to write, beside what the row asked for (node_id is never overwritten).
ALTER TABLE jobs ADD COLUMN ran_on TEXT;         -- the node of the latest attempt: node_id itself, or the member
ALTER TABLE jobs ADD COLUMN attempt_nodes TEXT;  -- JSON object, attempt number -> its node: {"1": "ci-2", "2": "ci-4"}
ALTER TABLE jobd_workers ADD COLUMN pools TEXT;  -- JSON object, pool -> {members, tools} it serves
