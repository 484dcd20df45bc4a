"""Prometheus metrics: counters the components bump, and gauges read from live objects.

The counters cost one lock-protected addition per message or request, never one per
stream: a message written to a thousand streams adds a thousand to ``events delivered``
in one call. Everything that describes a current state (open streams, backend links) is
read from the live objects when Prometheus scrapes, so it costs nothing in between.

The metrics are served by a plain-HTTP listener of their own, meant for a private address
(``SSE_METRICS_ADDRESS``, 127.0.0.1 by default), never on the public TLS port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ._listening import ListeningService
from ._messages import INVALID_REASONS
from ._server_name import NamedServerRequest

__all__ = [
    "GC_GENERATIONS",
    "REFUSAL_REASONS",
    "SKIP_REASONS",
    "SUBSCRIBE_OUTCOMES",
    "Metrics",
    "MetricsListenerService",
    "amqp_timestamp_seconds",
    "counter_total",
    "metrics_endpoint",
    "metrics_site",
]

SUBSCRIBE_OUTCOMES = (
    "ok",
    "bad_request",
    "forbidden",
    "origin_refused",
    "backend_unavailable",
    "too_many_streams",
    "too_many_checks",
    "auth_queue_full",
    "abandoned",
    "draining",
    "wrong_shard",
    "error",
)
"""How a subscribe request ended: the values of the ``outcome`` label.

``abandoned``: the client left before its check was answered; ``origin_refused``: CORS;
``too_many_streams``: a stream limit answered 429; ``too_many_checks``: the client address
had ``max_auth_checks_per_client`` checks in flight; ``auth_queue_full``:
``max_pending_auth_checks`` checks waited for PostgreSQL (both asked to come back later);
``draining``: the server was stopping (asked to come back, to another server);
``wrong_shard``: the user lives in a partition this server does not consume (a routing
mistake: asked to come back, for the load balancer to route it right).
"""

SKIP_REASONS = ("too_large", *INVALID_REASONS, "wrong_partition")
"""Why a message was skipped: the values of the ``reason`` label (the log line has detail).
``wrong_partition``: published to a partition its user does not live in."""

REFUSAL_REASONS = (
    "head_too_large",
    "head_too_slow",
    "malformed",
    "body_too_large",
    "body_too_slow",
)
"""Why a request was refused before it reached a resource: the values of the ``reason``
label (431, 408, 400, 413 or an HTTP/2 stream reset, 408 or a reset)."""

# Seconds from publish to write. The AMQP timestamp has whole seconds only, so a latency
# reads as up to one second more than it was: below 1 s the buckets say little.
_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# Seconds the reactor was held: from what nobody notices to what every stream does.
_STALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

GC_GENERATIONS = (0, 1, 2)
"""The garbage collector's generations: the values of the ``generation`` label."""


def amqp_timestamp_seconds(timestamp: int | None) -> float | None:
    """Seconds since the epoch of an AMQP ``timestamp`` property, if the message has one.

    The property holds whole seconds; a value too large for that (after the year 5000) is
    taken as milliseconds, which some publishers put there.
    """
    if timestamp is None:
        return None
    seconds = float(timestamp)
    return seconds / 1000 if seconds > 1e11 else seconds


def counter_total(counter: Counter) -> float:
    """The running total of an unlabelled counter (or of one label's child)."""
    return next(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def _bound(counter: Counter, values: Iterable[str]) -> dict[str, Counter]:
    """The child of ``counter`` (one label) for each of ``values``, bound once."""
    return {value: counter.labels(value) for value in values}


class Metrics:
    """Every counter and histogram of one server, in a registry of its own.

    Components get this object explicitly; a server built in a test has its own, so that
    tests can build many servers. Label values are bound once here, which keeps each
    update a dictionary lookup and an addition.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.subscribes = _bound(
            Counter(
                "sse_subscribes", "Subscribe requests, by outcome.", ["outcome"], registry=registry
            ),
            SUBSCRIBE_OUTCOMES,
        )
        self.messages_consumed = Counter(
            "sse_messages_consumed", "Messages read from the stream queue.", registry=registry
        )
        self.events_delivered = Counter(
            "sse_events_delivered",
            "Live events written to streams; one message to three streams counts three.",
            registry=registry,
        )
        self.messages_skipped = _bound(
            Counter(
                "sse_messages_skipped",
                "Messages not delivered because they are invalid, by reason.",
                ["reason"],
                registry=registry,
            ),
            SKIP_REASONS,
        )
        self.requests_refused = _bound(
            Counter(
                "sse_requests_refused",
                "Requests refused before they reached a resource, by reason.",
                ["reason"],
                registry=registry,
            ),
            REFUSAL_REASONS,
        )
        self.replay_events_sent = Counter(
            "sse_replay_events_sent",
            "Events replayed to reconnecting browsers (Last-Event-ID).",
            registry=registry,
        )
        self.slow_client_disconnects = Counter(
            "sse_slow_client_disconnects",
            "Streams dropped because their client stopped reading.",
            registry=registry,
        )
        self.publish_to_write_seconds = Histogram(
            "sse_publish_to_write_seconds",
            "From the AMQP timestamp of a message (whole seconds) to its write to the streams.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.reactor_lag_seconds = Histogram(
            "sse_reactor_lag_seconds",
            "How late a tick due every 50 ms ran: how long the reactor was held by other work.",
            buckets=_STALL_BUCKETS,
            registry=registry,
        )
        gc_pauses = Histogram(
            "sse_gc_pause_seconds",
            "Garbage collections, by the oldest generation collected.",
            ["generation"],
            buckets=_STALL_BUCKETS,
            registry=registry,
        )
        self.gc_pause_seconds = {
            generation: gc_pauses.labels(str(generation)) for generation in GC_GENERATIONS
        }
        ProcessCollector(registry=registry)

    def subscribed(self, outcome: str) -> None:
        """Count one subscribe request that ended with ``outcome``."""
        self.subscribes[outcome].inc()

    def skipped(self, reason: str) -> None:
        """Count one message skipped for ``reason`` (one of L{SKIP_REASONS})."""
        self.messages_skipped[reason].inc()

    def refused(self, reason: str) -> None:
        """Count one request refused for ``reason`` (one of L{REFUSAL_REASONS})."""
        self.requests_refused[reason].inc()

    def delivered(self, streams: int, published_at: float | None, now: float) -> None:
        """Count one message written to ``streams`` streams at ``now``.

        ``published_at`` is its AMQP timestamp, if it has one; the latency is only
        observed for a message that reached at least one stream.
        """
        if streams:
            self.events_delivered.inc(streams)
            if published_at is not None:
                self.publish_to_write_seconds.observe(max(0.0, now - published_at))

    def watch(
        self,
        streams: _Streams,
        consumer: _Consumer,
        authenticator: _Authenticator,
        auth_cache: _AuthCache | None = None,
        server_tls: _ServerTLS | None = None,
        replay_window: _ReplayWindow | None = None,
    ) -> None:
        """Report the state of these live objects on each scrape."""
        self.registry.register(
            _LiveState(streams, consumer, authenticator, auth_cache, server_tls, replay_window)
        )


class _Stream(Protocol):
    request: Any


class _Streams(Protocol):
    def __iter__(self) -> Iterator[_Stream]: ...


class _Consumer(Protocol):
    @property
    def consuming(self) -> bool: ...

    @property
    def last_offset(self) -> int | None: ...


class _Authenticator(Protocol):
    @property
    def connected(self) -> bool: ...


class _AuthCache(Protocol):
    hits: int


class _ServerTLS(Protocol):
    not_after: float
    reloads: dict[str, int]


class _ReplayWindow(Protocol):
    @property
    def bytes(self) -> int: ...

    @property
    def max_bytes(self) -> int: ...

    def __len__(self) -> int: ...


class _LiveState(Collector):
    """Gauges (and the auth cache's own hit count) computed when Prometheus scrapes."""

    def __init__(
        self,
        streams: _Streams,
        consumer: _Consumer,
        authenticator: _Authenticator,
        auth_cache: _AuthCache | None,
        server_tls: _ServerTLS | None,
        replay_window: _ReplayWindow | None = None,
    ) -> None:
        self._streams = streams
        self._replay_window = replay_window
        self._consumer = consumer
        self._authenticator = authenticator
        self._auth_cache = auth_cache
        self._server_tls = server_tls

    def collect(self) -> Iterable[Metric]:
        """One pass over the open streams, and a look at each backend link."""
        by_protocol = {"h1": 0, "h2": 0}
        for stream in self._streams:
            by_protocol["h2" if stream.request.clientproto == b"HTTP/2" else "h1"] += 1
        open_streams = GaugeMetricFamily(
            "sse_open_streams", "Event streams open now, by HTTP version.", labels=["protocol"]
        )
        for protocol, count in by_protocol.items():
            open_streams.add_metric([protocol], count)
        yield open_streams
        backend_up = GaugeMetricFamily(
            "sse_backend_up",
            "1 while the backend link works: RabbitMQ consuming, PostgreSQL connected.",
            labels=["backend"],
        )
        backend_up.add_metric(["rabbitmq"], float(self._consumer.consuming))
        backend_up.add_metric(["postgres"], float(self._authenticator.connected))
        yield backend_up
        if self._consumer.last_offset is not None:
            yield GaugeMetricFamily(
                "sse_stream_offset",
                "Stream queue offset of the last message handled.",
                value=self._consumer.last_offset,
            )
        if self._auth_cache is not None:
            yield CounterMetricFamily(
                "sse_auth_cache_hits",
                "Subscriber checks answered from the cache, without PostgreSQL.",
                value=self._auth_cache.hits,
            )
        if self._server_tls is not None:
            yield GaugeMetricFamily(
                "sse_tls_certificate_expiry_timestamp_seconds",
                "When the browser-facing certificate being served expires (Unix time).",
                value=self._server_tls.not_after,
            )
            reloads = CounterMetricFamily(
                "sse_tls_reloads",
                "Certificate reloads on SIGHUP, by outcome (refused: files not usable).",
                labels=["outcome"],
            )
            for outcome, count in self._server_tls.reloads.items():
                reloads.add_metric([outcome], count)
            yield reloads
        if self._replay_window is not None:
            yield from _replay_window_gauges(self._replay_window)


def _replay_window_gauges(window: _ReplayWindow) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "sse_replay_window_events", "Events kept for replay.", value=len(window)
    )
    yield GaugeMetricFamily(
        "sse_replay_window_bytes",
        "Bytes of the event frames kept for replay.",
        value=window.bytes,
    )
    yield GaugeMetricFamily(
        "sse_replay_window_max_bytes",
        "The bound on sse_replay_window_bytes (SSE_REPLAY_MAX_BYTES).",
        value=window.max_bytes,
    )


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encode(self._registry)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found: metrics are at /metrics\n"


class _MetricsRoot(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


class _QuietSite(Site):
    noisy = False
    requestFactory = NamedServerRequest

    def log(self, request: Request) -> None:  # type: ignore[override]
        """Nothing: a line per scrape would only bury the access log of streams."""


def metrics_site(metrics: Metrics, reactor: IReactorTime) -> Site:
    """The plain-HTTP site serving ``GET /metrics`` (text format, or OpenMetrics on request);
    its connections' timeouts run on ``reactor``."""
    root = _MetricsRoot()
    root.putChild(b"metrics", _MetricsPage(metrics.registry))
    return _QuietSite(root, reactor=reactor)


def metrics_endpoint(reactor: Any, address: str, port: int) -> IStreamServerEndpoint:
    """A TCP endpoint on ``address`` (IPv4 or IPv6 literal) and ``port``."""
    if ipaddress.ip_address(address).version == 6:
        return TCP6ServerEndpoint(reactor, port, interface=address)
    return TCP4ServerEndpoint(reactor, port, interface=address)


class MetricsListenerService(ListeningService):
    """Serve ``site`` on ``endpoint`` while running; ``listening`` fires with the port."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, site: Site) -> None:
        super().__init__(endpoint, site)

    def port_bound(self, port: IListeningPort) -> None:
        """Log where the metrics are served."""
        address = port.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        # Not "listening on ...": that line announces the public port.
        self.log.info(
            "serving metrics on http://{host}:{port}/metrics", host=address.host, port=address.port
        )
