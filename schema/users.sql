-- The subscribers table sse-twisted authenticates against (as the original Go service had it).
CREATE TABLE IF NOT EXISTS users (
    uuid varchar(36),
    sse_token varchar(36)
);
-- Every subscribe looks up (uuid, sse_token): keep it an index hit.
CREATE INDEX IF NOT EXISTS users_uuid_sse_token ON users (uuid, sse_token);

-- Revocation: deleting a row, or changing its uuid or sse_token, tells every sse-twisted
-- instance (LISTEN sse_revocations) to forget the user's cached grants and re-check its open
-- streams against this table, closing those no longer granted. The payload is the old uuid,
-- never the token. Needs PostgreSQL 14+ (OR REPLACE).
CREATE OR REPLACE FUNCTION sse_notify_revocation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.uuid IS NOT NULL AND (
        TG_OP = 'DELETE'
        OR NEW.uuid IS DISTINCT FROM OLD.uuid
        OR NEW.sse_token IS DISTINCT FROM OLD.sse_token
    ) THEN
        PERFORM pg_notify('sse_revocations', OLD.uuid);
    END IF;
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER users_sse_revocation
    AFTER UPDATE OF uuid, sse_token OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION sse_notify_revocation();

-- TRUNCATE fires no row trigger: it sends '*', and every instance re-checks all its open
-- streams against the table.
CREATE OR REPLACE FUNCTION sse_notify_truncation() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sse_revocations', '*');
    RETURN NULL;
END
$$;
CREATE OR REPLACE TRIGGER users_sse_truncation
    AFTER TRUNCATE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION sse_notify_truncation();
