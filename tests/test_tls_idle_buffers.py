"""An idle TLS connection gives its record buffers back: every browser connection's context,
HTTP/1.1 or HTTP/2 and after a certificate reload, has ``SSL_MODE_RELEASE_BUFFERS`` set.

Twisted's C{CertificateOptions} sets it; without it each idle stream keeps about 23 KB more
(bench S1, bench/RESULTS.md "Memory per idle stream"). These tests fail if the server's
context stops coming from there with the mode, e.g. when built by hand.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace

import pytest_twisted
from OpenSSL._util import lib
from OpenSSL.SSL import (
    MODE_RELEASE_BUFFERS,
    TLS_METHOD,
    Connection,
    Context,
    WantReadError,
)
from twisted.internet import reactor
from twisted.internet.protocol import Factory

from sse_twisted._tls_reload import ReloadableServerTLS


def _releases_idle_buffers(connection: Connection) -> bool:
    # pyOpenSSL has no getter, and refuses to touch a context once used: read the
    # connection's own mode through its binding (SSL_set_mode ORs 0 in and returns it).
    return bool(lib.SSL_set_mode(connection._ssl, 0) & MODE_RELEASE_BUFFERS)


def _handshake_offering(server: Connection, protocols: list[bytes]) -> bytes:
    """Complete a handshake in memory with a client that offers ``protocols`` by ALPN;
    return what the server chose."""
    # Twisted's ALPN callback reads the connection's TLS protocol for more protocols to offer;
    # a plain wrapped factory offers none beyond the context's list.
    server.set_app_data(SimpleNamespace(factory=SimpleNamespace(wrappedFactory=Factory())))
    client = Connection(Context(TLS_METHOD), None)
    client.set_alpn_protos(protocols)
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(5):  # TLS 1.3 completes in two flights each way
        for side, peer in ((client, server), (server, client)):
            with suppress(WantReadError):
                side.do_handshake()
            with suppress(WantReadError):
                peer.bio_write(side.bio_read(65536))
    return server.get_alpn_proto_negotiated()


def test_http2_and_http11_connections_release_their_buffers_while_idle(certs_dir: Path) -> None:
    tls = ReloadableServerTLS(certs_dir, reactor)
    for offer, chosen in (([b"h2", b"http/1.1"], b"h2"), ([b"http/1.1"], b"http/1.1")):
        connection = tls.serverConnectionForTLS(None)  # type: ignore[arg-type]
        assert _handshake_offering(connection, offer) == chosen
        assert _releases_idle_buffers(connection)


@pytest_twisted.ensureDeferred
async def test_connections_after_a_certificate_reload_release_their_buffers_while_idle(
    certs_dir: Path,
) -> None:
    tls = ReloadableServerTLS(certs_dir, reactor)
    before = tls.serverConnectionForTLS(None)  # type: ignore[arg-type]
    assert await tls.reload()
    after = tls.serverConnectionForTLS(None)  # type: ignore[arg-type]
    assert after.get_context() is not before.get_context()
    assert _releases_idle_buffers(after)
