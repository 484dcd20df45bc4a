"""Shared fixtures: the real TLS backends (started once per session, on first use) and a
database of its own on the machine's PostgreSQL."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from tests.backends import Pki
from tests.conftest_backends import pki, postgres_tls, rabbitmq_tls
from tests.harness import new_uuid

SCHEMA = Path(__file__).parent.parent / "schema" / "users.sql"

__all__ = ["pki", "postgres_tls", "rabbitmq_tls"]


@pytest.fixture(scope="session")
def local_database() -> Iterator[dict[str, str]]:
    """A fresh database with the users table on the machine's own PostgreSQL (plaintext),
    described as SSE_* settings; dropped at the end of the session."""
    name = f"sse_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    with (
        psycopg2.connect(host="127.0.0.1", user="postgres", dbname=name) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(SCHEMA.read_text())
    try:
        yield {
            "SSE_POSTGRES_HOST": "127.0.0.1",
            "SSE_POSTGRES_PORT": "5432",
            "SSE_POSTGRES_USERNAME": "postgres",
            "SSE_POSTGRES_DB_NAME": name,
            "SSE_POSTGRES_SSLMODE": "disable",
        }
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def plaintext_environ(tmp_path: Path, pki: Pki, local_database: dict[str, str]) -> dict[str, str]:
    """The settings `make run` uses: plaintext to the machine's PostgreSQL and RabbitMQ."""
    return {
        **local_database,
        "SSE_APP_ENV": "dev",
        "SSE_PORT": "0",
        "SSE_LISTEN_ADDRESS": "127.0.0.1",
        "SSE_METRICS_PORT": "0",
        "SSE_CERTS_DIR": str(pki.directory),
        "SSE_LOGS_DIR": str(tmp_path / "logs"),
        "SSE_RABBITMQ_TLS": "false",
        "SSE_RABBITMQ_HOST": "127.0.0.1",
        "SSE_RABBITMQ_QUEUE_NAME": f"messages-{new_uuid()}",
    }
