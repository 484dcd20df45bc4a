-- The subscribers table sse-twisted authenticates against (as the original Go service had it).
CREATE TABLE IF NOT EXISTS users (
    uuid varchar(36),
    sse_token varchar(36)
);
-- Every subscribe looks up (uuid, sse_token): keep it an index hit.
CREATE INDEX IF NOT EXISTS users_uuid_sse_token ON users (uuid, sse_token);
