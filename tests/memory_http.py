"""An in-memory HTTP layer: the real L{EventStreamSite} (its channel, its request limits,
the subscribe resource on a fake authenticator, ``/healthz``) with its connections on
L{StringTransport} and the site's timers (request deadlines, aborts, idle timeouts) on
L{MemoryServer.clock}; the subscribe resource has fake clocks of its own (tests/fakes.py).

As treq's C{RequestTraversalAgent} drives a real C{Site} in memory, but the client side is
raw bytes: these tests are about how the channel reads what no well-formed client sends
(an oversized head, junk, bytes pipelined behind a stream). No socket, no wall clock, no
global reactor: time passes only with L{MemoryServer.clock}C{.advance}.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from sse_twisted._health import LivenessResource
from sse_twisted._metrics import Metrics
from sse_twisted._resource import root_resource
from sse_twisted._site import EventStreamSite
from sse_twisted.interfaces import IAuthenticator
from tests.fakes import ImmediateAuthenticator, make_resource

__all__ = ["MemoryConnection", "MemoryServer", "decode_chunks", "responses"]


class MemoryConnection:
    """One client's connection to a L{MemoryServer}: what the client sends is one read of
    the server's protocol; what the server wrote piles up in L{received}."""

    def __init__(self, protocol: Any, transport: StringTransport) -> None:
        self.protocol = protocol
        self.transport = transport

    def send(self, data: bytes) -> None:
        """The server reads ``data`` in one read."""
        self.protocol.dataReceived(data)

    @property
    def received(self) -> bytes:
        """Every byte the server wrote so far."""
        return self.transport.value()

    @property
    def closing(self) -> bool:
        """Whether the server closed (or aborted) the connection."""
        return bool(self.transport.disconnecting)

    @property
    def aborted(self) -> bool:
        """Whether the server aborted the connection (no waiting for its writes to go)."""
        return bool(self.transport.disconnected)

    @property
    def reading(self) -> bool:
        """Whether the server reads from the connection (False: it paused the transport,
        and a real client's bytes would wait in the kernels' buffers)."""
        return self.transport.producerState == "producing"

    def client_stops_reading(self) -> None:
        """The client's receive window is full: the transport asks the server to stop
        writing, as a TCP transport does when its send buffer fills."""
        producer = self.transport.producer
        assert producer is not None, "the channel registers itself on connecting"
        producer.pauseProducing()

    def close(self) -> None:
        """The connection ends: the client went away, or read the server's close."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class MemoryServer:
    """The real site over fake parts: ``resource`` at its root, or the server's own tree
    (``/subscribe/...`` on ``authenticator``, every pair a subscriber by default, and
    ``/healthz``); ``site_options`` are more of L{EventStreamSite}'s keyword arguments."""

    def __init__(
        self,
        resource: Resource | None = None,
        authenticator: IAuthenticator | None = None,
        **site_options: Any,
    ) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.subscribe, self.registry = make_resource(
            authenticator or ImmediateAuthenticator(admit_everyone=True), metrics=self.metrics
        )
        if resource is None:
            resource = root_resource(self.subscribe)
            resource.putChild(b"healthz", LivenessResource())
        self.site = EventStreamSite(resource, self.clock, metrics=self.metrics, **site_options)

    def connect(self, client: str = "192.0.2.1") -> MemoryConnection:
        """A new connection from ``client``, as the listener would hand it to the site."""
        peer = IPv4Address("TCP", client, 50000)
        protocol = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return MemoryConnection(protocol, transport)

    def refused(self, reason: str) -> float:
        """How many requests were refused for ``reason`` (``sse_requests_refused_total``)."""
        value = self.metrics.registry.get_sample_value(
            "sse_requests_refused_total", {"reason": reason}
        )
        return value or 0.0


def responses(answer: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The status line and body of each Content-Length framed response at the start of
    ``answer``, and the bytes after the last of them."""
    found: list[tuple[bytes, bytes]] = []
    while True:
        head, separator, rest = answer.partition(b"\r\n\r\n")
        status, *header_lines = head.split(b"\r\n")
        lengths = [
            int(value)
            for name, _, value in (line.partition(b": ") for line in header_lines)
            if name.lower() == b"content-length"
        ]
        if not separator or len(lengths) != 1:
            return found, answer
        found.append((status, rest[: lengths[0]]))
        answer = rest[lengths[0] :]


def decode_chunks(data: bytes) -> tuple[bytes, bytes]:
    """The body carried by the complete chunks at the start of ``data`` (a chunked body
    after its head), and the bytes after them; a byte out of place in the framing raises
    L{ValueError}."""
    body = b""
    while True:
        size_line, separator, rest = data.partition(b"\r\n")
        if not separator:
            return body, data
        if not re.fullmatch(rb"[0-9a-f]{1,8}", size_line):
            raise ValueError(f"not a chunk size: {size_line[:80]!r}")
        size = int(size_line, 16)
        if len(rest) < size + 2:
            return body, data
        if rest[size : size + 2] != b"\r\n":
            raise ValueError(f"chunk of {size} bytes not followed by CRLF")
        body += rest[:size]
        data = rest[size + 2 :]
