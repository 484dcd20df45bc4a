"""A browser-like HTTPS client for the servers under test: it opens event streams and reads
them as an EventSource does."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, Response
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from tests.sse_parser import EventParser
from tests.waiting import TIMEOUT, bounded


class EventCollector(Protocol):
    """Reads an event-stream body as a browser would, queueing each dispatched event."""

    def __init__(self) -> None:
        self.parser = EventParser()
        self.events: DeferredQueue[dict[str, str]] = DeferredQueue()
        self.received: list[dict[str, str]] = []
        self.raw = b""
        self.closed: Deferred[None] = Deferred()
        self.close_reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        for event in self.parser.feed(data):
            self.received.append(event)
            self.events.put(event)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.close_reason = reason
        self.closed.callback(None)

    async def next_event(self, seconds: float = TIMEOUT) -> dict[str, str]:
        """The next event, failing after ``seconds``."""
        return await bounded(self.events.get(), seconds)

    def close(self) -> None:
        """Drop the connection, as a closed browser tab does."""
        if not self.closed.called and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


@implementer(IAgentEndpointFactory)
@dataclass
class _FromAddress:
    """Connects to 127.0.0.1 from ``source`` (any 127.0.0.0/8 address routes to lo)."""

    policy: BrowserLikePolicyForHTTPS
    source: str

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port, bindAddress=(self.source, 0))
        return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)


@dataclass
class Browser:
    """An HTTPS client trusting the test CA, one TLS connection per stream; connecting from
    ``source_address`` (another loopback address, say) when given."""

    ca_certificate: Path
    streams: list[EventCollector] = field(default_factory=list)
    source_address: str | None = None

    def __post_init__(self) -> None:
        policy = BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(self.ca_certificate.read_bytes())
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        if self.source_address is None:
            self._agent = Agent(reactor, policy, pool=pool)
        else:
            endpoints = _FromAddress(policy, self.source_address)
            self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    async def get(self, url: str, headers: dict[bytes, list[bytes]] | None = None) -> Response:
        """The response to ``GET url`` (its body not read)."""
        return await bounded(
            self._agent.request(b"GET", url.encode("ascii"), Headers(headers or {}))
        )

    async def open(
        self, url: str, last_event_id: str | None = None
    ) -> tuple[Response, EventCollector]:
        """Open an event stream, resuming after ``last_event_id`` as a reconnecting
        EventSource does; the collector receives its events."""
        headers = {b"accept": [b"text/event-stream"]}
        if last_event_id is not None:
            headers[b"last-event-id"] = [last_event_id.encode()]
        response = await self.get(url, headers)
        collector = EventCollector()
        response.deliverBody(collector)
        self.streams.append(collector)
        return response, collector

    async def read_body(self, response: Response) -> bytes:
        """The whole body of a response that ends."""
        collector = EventCollector()
        response.deliverBody(collector)
        await bounded(collector.closed)
        return collector.raw

    async def close_all(self) -> None:
        """Close every stream this browser opened and wait for the connections to end."""
        for stream in self.streams:
            stream.close()
        for stream in self.streams:
            await bounded(stream.closed)
