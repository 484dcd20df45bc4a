"""Draining an HTTP/1.1 connection and batching HTTP/2 frames, in memory (the real server
under real clients is in test_drain.py and test_end_to_end.py). The guard on the private
Twisted names ``sse_twisted._channel`` uses is in test_private_names.py."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from sse_twisted._channel import BatchingH2Connection, DrainingChannelProtocol
from sse_twisted._metrics import Metrics
from sse_twisted._site import EventStreamSite


class _Held(Resource):
    """Holds every request open, as a stream is held, for the test to end."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


def _connection(
    clock: Clock | None = None, transport: StringTransport | None = None
) -> tuple[DrainingChannelProtocol, StringTransport, _Held]:
    clock = clock or Clock()
    held = _Held()
    site = EventStreamSite(held, clock, request_timeout=10, metrics=Metrics())
    protocol = site.buildProtocol(None)
    assert isinstance(protocol, DrainingChannelProtocol)
    transport = transport or StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, held


class _WritesTransport(StringTransport):
    """A transport on which ALPN chose HTTP/2, that keeps each write apart."""

    negotiatedProtocol = b"h2"

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


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


def test_an_h2_connection_sends_what_its_streams_got_in_one_turn_in_one_write_in_order() -> None:
    clock = Clock()
    protocol, transport, held = _connection(clock, _WritesTransport())
    assert isinstance(transport, _WritesTransport)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    streams = (1, 3, 5)
    for stream in streams:
        client.send_headers(
            stream,
            [(":method", "GET"), (":scheme", "https"), (":authority", "h"), (":path", "/")],
            end_stream=True,
        )
    protocol.dataReceived(client.data_to_send())
    assert isinstance(protocol._channel, BatchingH2Connection)
    for request in held.requests:
        request.write(b"head")
    clock.advance(0)
    client.receive_data(transport.value())
    transport.writes.clear()

    for number in range(2):
        for stream, request in zip(streams, held.requests, strict=True):
            request.write(b"event %d of %d" % (number, stream))
    assert transport.writes == []
    clock.advance(0)

    [write] = transport.writes
    received = [
        (event.stream_id, event.data)
        for event in client.receive_data(write)
        if isinstance(event, h2.events.DataReceived)
    ]
    assert received == [
        (stream, b"event %d of %d" % (number, stream)) for number in range(2) for stream in streams
    ]


def test_an_h2_stream_with_its_window_shut_does_not_hold_the_reactor() -> None:
    clock = Clock()
    protocol, transport, held = _connection(clock, _WritesTransport())
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "h"), (":path", "/")],
        end_stream=True,
    )
    protocol.dataReceived(client.data_to_send())
    [request] = held.requests
    request.write(b"waits for a window")
    request.finish()

    # A turn tries once and gives the reactor back, to try again in the next turn (a loop
    # would never return). Clock.advance would run the next turn at once, and the next.
    channel = protocol._channel
    assert isinstance(channel, BatchingH2Connection)
    retries = len(clock.getDelayedCalls())
    channel._sendPrioritisedData()
    assert len(clock.getDelayedCalls()) == retries + 1
    assert not any(
        isinstance(event, h2.events.DataReceived)
        for event in client.receive_data(transport.value())
    )
