"""Session-scoped fixtures for real TLS backends; register with ``pytest_plugins``.

The fixtures are synchronous and start each server once per session, on first use.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.backends import Pki, PostgresServer, RabbitMQServer


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Development certificates for every backend, plus an unrelated CA."""
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def postgres_tls(pki: Pki) -> Iterator[PostgresServer]:
    """PostgreSQL with database ``sse`` and table ``users``, reachable over TLS only."""
    server = PostgresServer.launch(pki)
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def rabbitmq_tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """RabbitMQ with plain AMQP and an amqps listener that demands a client certificate."""
    server = RabbitMQServer.launch(pki, tmp_path_factory.mktemp("rabbitmq"))
    yield server
    server.terminate()
