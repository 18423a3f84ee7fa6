-- Wake-ups: every daemon LISTENs on `nexus_jobd`. A new row (one notification per INSERT statement, however
-- many rows), and a row that becomes cancelled (kill it) or queued again (retry, re-queue: claim it), notify.
-- A daemon's own claims and finishes do not: nobody needs waking for them.
CREATE OR REPLACE FUNCTION jobd_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('nexus_jobd', TG_OP);
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER jobd_jobs_inserted AFTER INSERT ON jobs
    FOR EACH STATEMENT EXECUTE FUNCTION jobd_notify();
CREATE OR REPLACE TRIGGER jobd_jobs_status AFTER UPDATE OF status ON jobs
    FOR EACH ROW WHEN (NEW.status IN ('cancelled', 'queued') AND OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION jobd_notify();
