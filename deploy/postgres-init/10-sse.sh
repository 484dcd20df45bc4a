#!/bin/sh
# Runs once, when the postgres container initialises an empty data volume (the image runs
# every script in /docker-entrypoint-initdb.d): every schema file (the users table, the
# revocation triggers) and a login role APP_DB_USER for the server that may only read. Its
# password is the file APP_DB_PASSWORD_FILE names, without trailing newlines (as the
# server reads it), and reaches psql through the environment, never its arguments (which
# `ps` shows). With DEMO_USERID and DEMO_TOKEN set, also that subscriber (the compose
# stack sets neither: a well-known token has no place in a prod database).
# Without its execute bit the image sources it instead: hence no exit and no `set -u`.
set -e

for schema in "${SCHEMA_DIR:-/schema}"/*.sql; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" -f "$schema"
done
APP_DB_PASSWORD=$(cat "$APP_DB_PASSWORD_FILE")
export APP_DB_PASSWORD
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v role="$APP_DB_USER" <<'SQL'
\getenv password APP_DB_PASSWORD
CREATE ROLE :"role" LOGIN PASSWORD :'password';
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"role";
SQL
unset APP_DB_PASSWORD
if [ -n "${DEMO_USERID:-}" ] && [ -n "${DEMO_TOKEN:-}" ]; then
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -v userid="$DEMO_USERID" -v token="$DEMO_TOKEN" <<'SQL'
INSERT INTO users (uuid, sse_token) SELECT :'userid', :'token'
    WHERE NOT EXISTS (SELECT 1 FROM users WHERE uuid = :'userid' AND sse_token = :'token');
SQL
fi
