#!/bin/sh
# install-certs.sh OWNER DIRECTORY FILE... [-- COMMAND [ARGUMENT...]]
#
# Copies each FILE from $CERTS_SOURCE (default /certs, ./certs mounted read-only) into
# DIRECTORY, owned by OWNER: private keys (names containing "key") 0600, certificates 0644.
# Then runs COMMAND, if given, in place of this script.
#
# Why a copy: `make certs` writes keys 0600 for the host user, which the services' own
# users cannot read, and PostgreSQL refuses a key that is not owned by its user with 0600.
# It runs as the container's root, which can read the mounted keys, and each service gets
# copies that belong to the user that reads them.
set -eu

if [ $# -lt 3 ]; then
    echo "usage: install-certs.sh OWNER DIRECTORY FILE... [-- COMMAND...]" >&2
    exit 2
fi
source=${CERTS_SOURCE:-/certs}
owner=$1
directory=$2
shift 2

mkdir -p "$directory"
chown "$owner" "$directory"
chmod 0700 "$directory"
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    name=$1
    shift
    case $name in
        *key*) mode=0600 ;;
        *) mode=0644 ;;
    esac
    if [ ! -r "$source/$name" ]; then
        echo "install-certs.sh: cannot read $source/$name: run 'make certs' first" >&2
        exit 1
    fi
    install -m "$mode" -o "$owner" "$source/$name" "$directory/$name"
done
echo "install-certs.sh: certificates for $owner installed in $directory"
if [ $# -gt 0 ]; then
    shift
fi
if [ $# -gt 0 ]; then
    exec "$@"
fi
