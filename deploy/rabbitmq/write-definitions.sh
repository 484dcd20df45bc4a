#!/bin/sh
# write-definitions.sh OUTPUT [-- COMMAND [ARGUMENT...]]
#
# Writes the broker's definitions to OUTPUT (owned by rabbitmq, 0600), which the node loads
# at boot (load_definitions in 20-sse-tls.conf), then runs COMMAND, if given, in its place.
# Passwords come from secret files and only their salted SHA-256 reaches OUTPUT:
#
#   RABBITMQ_SSE_USER, RABBITMQ_SSE_PASSWORD_FILE      the server's account: on vhost /, it
#       may declare (configure) and consume (read) the stream queue RABBITMQ_SSE_QUEUE, or
#       with SSE_RABBITMQ_PARTITIONS above 1 the super stream of that name (the exchange
#       RABBITMQ_SSE_QUEUE and the partitions RABBITMQ_SSE_QUEUE-0, -1, ...: configure and
#       read both, write the partitions, which binding them to the exchange needs), and
#       nothing else: no publishing (that needs write on an exchange), no other queue or
#       exchange.
#   RABBITMQ_ADMIN_USER, RABBITMQ_ADMIN_PASSWORD_FILE  an administrator, for the management
#       UI and publishing by hand.
#
# A node that loads definitions at boot creates no default user (no guest, no
# RABBITMQ_DEFAULT_USER): these two are the only accounts. Runs as the container's root,
# which can read the secret files whoever owns them.
set -eu

if [ $# -lt 1 ]; then
    echo "usage: write-definitions.sh OUTPUT [-- COMMAND...]" >&2
    exit 2
fi
output=$1
shift

# The names go into JSON strings and the queue into a permission regex unescaped.
for name in "$RABBITMQ_SSE_USER" "$RABBITMQ_ADMIN_USER" "$RABBITMQ_SSE_QUEUE"; do
    case $name in
        "" | *[!A-Za-z0-9_-]*)
            echo "write-definitions.sh: $name: use letters, digits, - and _ only" >&2
            exit 1
            ;;
    esac
done

# rabbit_password_hashing_sha256: base64(salt + sha256(salt + password)), 4-byte salt.
# The password is the file without its trailing newlines, as sse-twisted reads it.
password_hash() {
    work=$(mktemp -d)
    head -c 4 /dev/urandom >"$work/salt"
    printf '%s' "$(cat "$1")" >"$work/password"
    cat "$work/salt" "$work/password" | openssl dgst -sha256 -binary >"$work/digest"
    cat "$work/salt" "$work/digest" | base64 | tr -d '\n'
    rm -rf "$work"
}

for file in "$RABBITMQ_SSE_PASSWORD_FILE" "$RABBITMQ_ADMIN_PASSWORD_FILE"; do
    if [ ! -r "$file" ]; then
        echo "write-definitions.sh: cannot read $file" >&2
        exit 1
    fi
done
sse_hash=$(password_hash "$RABBITMQ_SSE_PASSWORD_FILE")
admin_hash=$(password_hash "$RABBITMQ_ADMIN_PASSWORD_FILE")
owner=${DEFINITIONS_OWNER:-rabbitmq}

umask 077
cat >"$output" <<JSON
{
  "vhosts": [{"name": "/"}],
  "users": [
    {"name": "$RABBITMQ_SSE_USER", "password_hash": "$sse_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []},
    {"name": "$RABBITMQ_ADMIN_USER", "password_hash": "$admin_hash",
     "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"]}
  ],
  "permissions": [
    {"user": "$RABBITMQ_SSE_USER", "vhost": "/",
     "configure": "^$RABBITMQ_SSE_QUEUE(-[0-9]+)?\$",
     "write": "^$RABBITMQ_SSE_QUEUE-[0-9]+\$",
     "read": "^$RABBITMQ_SSE_QUEUE(-[0-9]+)?\$"},
    {"user": "$RABBITMQ_ADMIN_USER", "vhost": "/",
     "configure": ".*", "write": ".*", "read": ".*"}
  ]
}
JSON
chown "$owner" "$output"
echo "write-definitions.sh: users $RABBITMQ_SSE_USER and $RABBITMQ_ADMIN_USER written to $output"
if [ $# -gt 0 ]; then
    shift
fi
if [ $# -gt 0 ]; then
    exec "$@"
fi
