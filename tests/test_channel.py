"""Draining an HTTP/1.1 connection, in memory (the real server under real clients is in
test_drain.py). The guard on the private Twisted names ``sse_twisted._channel`` uses is in
test_private_names.py."""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sse_twisted._channel import DrainingChannelProtocol
from tests.memory_http import MemoryServer


class _Held(Resource):
    """Holds every request open, as a stream is held, for the test to end."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


def _connection() -> tuple[DrainingChannelProtocol, StringTransport, _Held]:
    held = _Held()
    connection = MemoryServer(held, request_timeout=10).connect()
    assert isinstance(connection.protocol, DrainingChannelProtocol)
    return connection.protocol, connection.transport, held


def _end(request: Request) -> None:
    request.write(b"retry: 3000\n\n")
    request.finish()


def test_the_drain_closes_an_idle_http1_connection_at_once() -> None:
    protocol, transport, held = _connection()
    protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    _end(held.requests[0])
    assert not transport.disconnecting  # kept alive for the next request
    protocol.drain()
    assert transport.disconnecting


def test_a_drained_http1_connection_closes_after_its_response_and_serves_nothing_more() -> None:
    protocol, transport, held = _connection()
    # A second request pipelined behind the held one.
    protocol.dataReceived(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
    protocol.drain()
    _end(held.requests[0])
    assert transport.value().endswith(b"retry: 3000\n\n\r\n0\r\n\r\n")
    assert transport.disconnecting
    assert [request.path for request in held.requests] == [b"/a"]


def test_a_request_whose_head_ends_during_the_drain_is_answered_with_connection_close() -> None:
    protocol, transport, held = _connection()
    protocol.dataReceived(b"GET /a HTTP/1.1\r\n")
    protocol.drain()
    assert not transport.disconnecting
    protocol.dataReceived(b"Host: h\r\n\r\n")
    _end(held.requests[0])
    head = transport.value().split(b"\r\n\r\n")[0].lower()
    assert b"\r\nconnection: close" in head
    assert transport.disconnecting
