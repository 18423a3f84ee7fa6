-- Pools: a row's node_id may name a pool, and the node that runs it is chosen as it is claimed. Where each attempt
-- ran is the daemon's to write, beside what the row asked for (node_id is never overwritten). JSON as TEXT, as the
-- other JSON columns here (capabilities, env, jobd_workers.nodes): both backends hand other programs the same text.
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS ran_on TEXT;          -- the node of the latest attempt
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS attempt_nodes TEXT;   -- JSON object, attempt number -> its node: {"1": "ci-2"}
ALTER TABLE jobd_workers ADD COLUMN IF NOT EXISTS pools TEXT;   -- JSON object, pool -> {members, tools} it serves

-- attempt_nodes with one more attempt recorded. What another program wrote there that is no JSON object is
-- started afresh, never an error: a claim must not fail on a bad column of the daemon's own.
CREATE OR REPLACE FUNCTION jobd_attempt_nodes(recorded TEXT, attempt BIGINT, node TEXT) RETURNS TEXT
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    so_far jsonb := '{}';
BEGIN
    IF recorded IS NOT NULL THEN
        BEGIN
            so_far := recorded::jsonb;
        EXCEPTION WHEN others THEN
            so_far := '{}';
        END;
        IF jsonb_typeof(so_far) IS DISTINCT FROM 'object' THEN
            so_far := '{}';
        END IF;
    END IF;
    RETURN (so_far || jsonb_build_object(attempt::text, node))::text;
END $$;
