"""A browser that reconnects resumes its TLS session (a ticket) instead of a full handshake,
in TLS 1.3 and 1.2, over the server's real listening socket and TLS connection creator."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from sse_twisted._tls_reload import ReloadableServerTLS
from tests.backends import Pki
from tests.certificates import renew_certificate

_GREETING = b"hello\n"


class _Greeter(Protocol):
    """Writes a line once the handshake is done: the client reads it, and with it the
    session tickets the server sent after its handshake (TLS 1.3 sends them then)."""

    def connectionMade(self) -> None:
        self.transport.write(_GREETING)  # type: ignore[union-attr]


def client(ca: Path, version: ssl.TLSVersion) -> ssl.SSLContext:
    """A verifying client context (a session resumes only on the context it came from)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    return context


def _connect(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[ssl.SSLSession | None, bool]:
    """One connection; its session (to resume later) and whether it resumed one."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as connection,
    ):
        assert connection.recv(len(_GREETING)) == _GREETING
        return connection.session, connection.session_reused


async def connect(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession | None, bool]:
    return await deferToThread(_connect, port, context, session)


@pytest_twisted.async_yield_fixture
async def tls_server(certs_dir: Path) -> AsyncIterator[tuple[ReloadableServerTLS, int]]:
    """The server's TLS connection creator on a port of its own."""
    tls = ReloadableServerTLS(certs_dir, reactor)
    endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
    port: IListeningPort = await endpoint.listen(Factory.forProtocol(_Greeter))
    try:
        yield tls, port.getHost().port  # type: ignore[attr-defined]
    finally:
        await port.stopListening()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest_twisted.ensureDeferred
async def test_a_client_that_reconnects_with_its_session_resumes_it(
    tls_server: tuple[ReloadableServerTLS, int], pki: Pki, version: ssl.TLSVersion
) -> None:
    _, port = tls_server
    context = client(pki.ca_certificate, version)
    session, resumed = await connect(port, context)
    assert session is not None and not resumed

    _, resumed = await connect(port, context, session)

    assert resumed


@pytest_twisted.ensureDeferred
async def test_a_session_from_before_a_certificate_reload_gets_a_full_handshake(
    tls_server: tuple[ReloadableServerTLS, int], certs_dir: Path, pki: Pki
) -> None:
    tls, port = tls_server
    context = client(pki.ca_certificate, ssl.TLSVersion.TLSv1_3)
    before, _ = await connect(port, context)
    renew_certificate(certs_dir)
    assert await tls.reload()

    # The new context's ticket keys cannot open the old ticket: the client is served the
    # renewed certificate in a full handshake, and resumes with its new session after it.
    after, resumed = await connect(port, context, before)
    assert not resumed
    _, resumed = await connect(port, context, after)
    assert resumed
