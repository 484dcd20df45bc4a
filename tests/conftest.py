"""Shared fixtures: the real TLS backends (started once per session, on first use) and a
database of its own on the machine's PostgreSQL."""

import io
import logging
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted
from twisted.logger import LogEvent, capturedLogs, globalLogPublisher

from sse_twisted._logging import JSONLogObserver
from tests.backends import Pki, PostgresServer, RabbitMQServer
from tests.browser import Browser
from tests.conftest_backends import pki, postgres_tls, rabbitmq_tls
from tests.proxies import installed_node
from tests.publishing import delete_queue
from tests.secrets_tracking import LOGGED_TEXT, USED_SECRETS, leaked_secrets, new_uuid

SCHEMA = Path(__file__).parent.parent / "schema" / "users.sql"

__all__ = ["pki", "postgres_tls", "rabbitmq_tls"]

# Every line logged in this process during the session, formatted as a server would write it
# (with the same subscribe-path masking, but no configured secrets to mask: code must not log
# them in the first place). twistd subprocesses add their output to LOGGED_TEXT themselves.
_SESSION_LOG = io.StringIO()
_SESSION_OBSERVER = JSONLogObserver(env="test", index="test", logs_dir=None, stream=_SESSION_LOG)


class _StandardLoggingCollector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _SESSION_LOG.write(f"{record.name}: {record.getMessage()}\n")


_STANDARD_COLLECTOR = _StandardLoggingCollector()


def pytest_sessionstart(session: pytest.Session) -> None:
    globalLogPublisher.addObserver(_SESSION_OBSERVER)
    logging.getLogger().addHandler(_STANDARD_COLLECTOR)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a token or password a test used reached any log line."""
    globalLogPublisher.removeObserver(_SESSION_OBSERVER)
    logging.getLogger().removeHandler(_STANDARD_COLLECTOR)
    leaks = leaked_secrets([_SESSION_LOG.getvalue(), *LOGGED_TEXT], USED_SECRETS)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = len(_SESSION_LOG.getvalue().splitlines()) + sum(t.count("\n") for t in LOGGED_TEXT)
    summary = f"secrets audit: {len(USED_SECRETS)} secrets, {lines} log lines, {len(leaks)} leaked"
    if reporter is not None:
        reporter.write_line(summary)
    if leaks:
        for secret, line in leaks.items():
            message = f"SECRET LEAKED INTO THE LOG: {secret!r} in {line[:500]}"
            if reporter is not None:
                reporter.write_line(message, red=True, bold=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with the npm eventsource client installed (``npm ci`` once a
    session, for every test that runs the real EventSource client)."""
    return installed_node()


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
def certs_dir(tmp_path: Path, pki: Pki) -> Path:
    """A copy of the test PKI that a test may renew in place."""
    return Path(shutil.copytree(pki.directory, tmp_path / "certs"))


@pytest.fixture
def plaintext_environ(
    tmp_path: Path, pki: Pki, local_database: dict[str, str]
) -> Iterator[dict[str, str]]:
    """The settings `make run` uses: plaintext to the machine's PostgreSQL and RabbitMQ; the
    stream queue is deleted after the test."""
    environ = {
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
    yield environ
    delete_queue(5672, environ["SSE_RABBITMQ_QUEUE_NAME"])


@pytest.fixture
def tls_environ(
    pki: Pki, postgres_tls: PostgresServer, rabbitmq_tls: RabbitMQServer
) -> Iterator[dict[str, str]]:
    """Settings for TLS to both private backends, and a fresh stream queue (deleted after
    the test)."""
    environ = {
        "SSE_CERTS_DIR": str(pki.directory),
        **postgres_tls.settings(),
        "SSE_POSTGRES_TIMEOUT_SECONDS": "2",
        "SSE_RABBITMQ_HOST": rabbitmq_tls.host,
        "SSE_RABBITMQ_PORT": str(rabbitmq_tls.amqps_port),
        "SSE_RABBITMQ_QUEUE_NAME": f"messages-{new_uuid()}",
        "SSE_RETRY_MILLISECONDS": "500",
        "SSE_METRICS_PORT": "0",
        # A twistd made from these listens on a free port, never on the default 8001.
        "SSE_PORT": "0",
        "SSE_LISTEN_ADDRESS": "127.0.0.1",
    }
    yield environ
    delete_queue(rabbitmq_tls.amqp_port, environ["SSE_RABBITMQ_QUEUE_NAME"])


@pytest_twisted.async_yield_fixture
async def browser(pki: Pki) -> AsyncIterator[Browser]:
    """An HTTPS client trusting the test CA; its streams are closed after the test."""
    client = Browser(pki.ca_certificate)
    yield client
    await client.close_all()


@pytest.fixture
def log_events() -> Iterator[Sequence[LogEvent]]:
    """Every log event emitted during the test."""
    with capturedLogs() as events:
        yield events
