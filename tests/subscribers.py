"""Subscribers as the servers under test find them: (userid, token) rows in a users table."""

from __future__ import annotations

import psycopg2

from tests.backends import PostgresServer
from tests.secrets_tracking import new_token, new_uuid


def add_subscriber(postgres: PostgresServer) -> tuple[str, str]:
    """A new (userid, token) row in the users table of ``postgres``."""
    userid, token = new_uuid(), new_token()
    postgres.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
    return userid, token


def add_local_subscriber(database: str) -> tuple[str, str]:
    """A new (userid, token) row in ``database`` on the machine's own PostgreSQL."""
    userid, token = new_uuid(), new_token()
    with (
        psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
    return userid, token
