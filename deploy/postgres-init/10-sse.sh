#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume (the image runs
# every script in /docker-entrypoint-initdb.d): every schema file (the users table, the
# revocation triggers), a login role for the server that may only read, and the demo user.
# Without its execute bit the image sources it instead: hence no exit and no `set -u`.
set -e

for schema in "${SCHEMA_DIR:-/schema}"/*.sql; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$schema"
done
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v role="$APP_DB_USER" -v password="$APP_DB_PASSWORD" \
    -v userid="$DEMO_USERID" -v token="$DEMO_TOKEN" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"role";
INSERT INTO users (uuid, sse_token) SELECT :'userid', :'token'
    WHERE NOT EXISTS (SELECT 1 FROM users WHERE uuid = :'userid' AND sse_token = :'token');
SQL
