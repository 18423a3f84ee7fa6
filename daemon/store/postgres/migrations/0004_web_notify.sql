-- The web console (`nexus-jobd web`) follows rows as they change: every statement that writes jobs (output, status,
-- a new or deleted row) or nodes (heartbeats) notifies `nexus_jobd_rows`. Only the console LISTENs on it; daemons
-- LISTEN on `nexus_jobd` alone and are not woken. One notification per statement (and PostgreSQL folds equal ones
-- of a transaction into one), whatever the number of rows.
CREATE OR REPLACE FUNCTION jobd_notify_rows() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nexus_jobd_rows', TG_TABLE_NAME);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER jobd_jobs_rows AFTER INSERT OR UPDATE OR DELETE ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobd_notify_rows();
CREATE OR REPLACE TRIGGER jobd_nodes_rows AFTER INSERT OR UPDATE OR DELETE ON nodes
    FOR EACH STATEMENT EXECUTE FUNCTION jobd_notify_rows();
