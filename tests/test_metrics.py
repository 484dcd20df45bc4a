"""Prometheus metrics: counters, scrape-time gauges, and the private plain-HTTP listener."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.client import Agent, Response

from sse_twisted._metrics import (
    SKIP_REASONS,
    SUBSCRIBE_OUTCOMES,
    Metrics,
    MetricsListenerService,
    amqp_timestamp_seconds,
    metrics_endpoint,
    metrics_site,
)
from sse_twisted._tls_reload import ReloadableServerTLS
from tests.browser import EventCollector
from tests.certificates import renew_certificate
from tests.fakes import ImmediateAuthenticator
from tests.waiting import bounded


async def read_body(response: Response) -> bytes:
    collector = EventCollector()
    response.deliverBody(collector)
    await bounded(collector.closed)
    return collector.raw


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition text, keyed by name and sorted labels."""
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


@dataclass
class FakeRequest:
    clientproto: bytes


@dataclass
class FakeStream:
    request: FakeRequest


@dataclass
class FakeConsumer:
    consuming: bool = False
    last_offset: int | None = None


@dataclass
class FakeAuthCache:
    hits: int = 0


@dataclass
class FakeRegistry:
    streams: list[FakeStream] = field(default_factory=list)

    def __iter__(self) -> Any:
        return iter(self.streams)


def test_every_outcome_and_skip_reason_is_exposed_from_zero() -> None:
    metrics = Metrics()
    for outcome in SUBSCRIBE_OUTCOMES:
        assert value(metrics, "sse_subscribes_total", outcome=outcome) == 0
    for reason in SKIP_REASONS:
        assert value(metrics, "sse_messages_skipped_total", reason=reason) == 0
    assert value(metrics, "sse_messages_consumed_total") == 0


def test_counters_count_and_two_servers_do_not_share_them() -> None:
    first, second = Metrics(), Metrics()
    first.subscribed("ok")
    first.subscribed("ok")
    first.subscribed("forbidden")
    first.skipped("too_large")
    first.messages_consumed.inc()
    assert value(first, "sse_subscribes_total", outcome="ok") == 2
    assert value(first, "sse_subscribes_total", outcome="forbidden") == 1
    assert value(first, "sse_messages_skipped_total", reason="too_large") == 1
    assert value(first, "sse_messages_consumed_total") == 1
    assert value(second, "sse_subscribes_total", outcome="ok") == 0


def test_a_message_to_three_streams_counts_three_events_and_one_latency() -> None:
    metrics = Metrics()
    metrics.delivered(3, published_at=100.0, now=101.2)
    metrics.delivered(0, published_at=100.0, now=101.2)
    metrics.delivered(2, published_at=None, now=101.2)
    assert value(metrics, "sse_events_delivered_total") == 5
    assert value(metrics, "sse_publish_to_write_seconds_count") == 1
    assert value(metrics, "sse_publish_to_write_seconds_sum") == pytest.approx(1.2)
    assert value(metrics, "sse_publish_to_write_seconds_bucket", le="1.0") == 0
    assert value(metrics, "sse_publish_to_write_seconds_bucket", le="1.5") == 1


def test_a_publisher_clock_ahead_of_ours_is_not_a_negative_latency() -> None:
    metrics = Metrics()
    metrics.delivered(1, published_at=105.0, now=101.0)
    assert value(metrics, "sse_publish_to_write_seconds_sum") == 0


def test_gauges_are_read_from_the_live_objects_at_each_scrape() -> None:
    metrics = Metrics()
    streams = FakeRegistry()
    consumer, authenticator, cache = FakeConsumer(), ImmediateAuthenticator(), FakeAuthCache()
    authenticator.connected = False
    metrics.watch(streams, consumer, authenticator, cache)
    assert value(metrics, "sse_open_streams", protocol="h1") == 0
    assert value(metrics, "sse_open_streams", protocol="h2") == 0
    assert value(metrics, "sse_backend_up", backend="rabbitmq") == 0
    assert ("sse_stream_offset", ()) not in samples(metrics)

    streams.streams += [
        FakeStream(FakeRequest(b"HTTP/2")),
        FakeStream(FakeRequest(b"HTTP/1.1")),
        FakeStream(FakeRequest(b"HTTP/2")),
    ]
    consumer.consuming, consumer.last_offset = True, 41
    authenticator.connected = True
    cache.hits = 7

    assert value(metrics, "sse_open_streams", protocol="h2") == 2
    assert value(metrics, "sse_open_streams", protocol="h1") == 1
    assert value(metrics, "sse_backend_up", backend="rabbitmq") == 1
    assert value(metrics, "sse_backend_up", backend="postgres") == 1
    assert value(metrics, "sse_stream_offset") == 41
    assert value(metrics, "sse_auth_cache_hits_total") == 7


@pytest_twisted.ensureDeferred
async def test_the_served_certificates_expiry_and_each_reload_outcome_are_metrics(
    certs_dir: Path,
) -> None:
    server_tls = ReloadableServerTLS(certs_dir, reactor)
    metrics = Metrics()
    metrics.watch(FakeRegistry(), FakeConsumer(), ImmediateAuthenticator(), None, server_tls)
    first = value(metrics, "sse_tls_certificate_expiry_timestamp_seconds")
    assert value(metrics, "sse_tls_reloads_total", outcome="ok") == 0

    renew_certificate(certs_dir, with_key=False)
    assert not await server_tls.reload()
    assert value(metrics, "sse_tls_reloads_total", outcome="refused") == 1
    assert value(metrics, "sse_tls_certificate_expiry_timestamp_seconds") == first

    renewed = renew_certificate(certs_dir)
    assert await server_tls.reload()
    assert value(metrics, "sse_tls_reloads_total", outcome="ok") == 1
    expiry = value(metrics, "sse_tls_certificate_expiry_timestamp_seconds")
    assert expiry == renewed.not_valid_after_utc.timestamp() != first


def test_the_endpoint_follows_the_address_family() -> None:
    assert isinstance(metrics_endpoint(reactor, "127.0.0.1", 9464), TCP4ServerEndpoint)
    assert isinstance(metrics_endpoint(reactor, "::1", 9464), TCP6ServerEndpoint)


@pytest_twisted.ensureDeferred
async def test_the_listener_serves_metrics_over_plain_http_and_nothing_else() -> None:
    metrics = Metrics()
    metrics.subscribed("bad_request")
    listener = MetricsListenerService(
        metrics_endpoint(reactor, "127.0.0.1", 0), metrics_site(metrics, reactor)
    )
    listener.startService()
    try:
        port = (await bounded(listener.listening)).getHost().port
        agent = Agent(reactor)
        response = await bounded(agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode()))
        body = (await read_body(response)).decode()
        assert response.code == 200
        [content_type] = response.headers.getRawHeaders(b"content-type")
        assert content_type.startswith(b"text/plain")
        assert 'sse_subscribes_total{outcome="bad_request"} 1.0' in body
        assert "process_open_fds" in body
        elsewhere = await bounded(agent.request(b"GET", f"http://127.0.0.1:{port}/".encode()))
        await read_body(elsewhere)
        assert elsewhere.code == 404
    finally:
        await listener.stopService()


def test_the_amqp_timestamp_is_read_as_seconds_or_as_milliseconds_when_that_large() -> None:
    assert amqp_timestamp_seconds(None) is None
    assert amqp_timestamp_seconds(1_900_000_000) == 1_900_000_000.0
    assert amqp_timestamp_seconds(1_900_000_000_250) == 1_900_000_000.25


def test_the_metrics_site_times_out_idle_connections_on_the_clock_it_is_given() -> None:
    clock = Clock()
    site = metrics_site(Metrics(), clock)
    protocol = site.buildProtocol(None)
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert site.timeOut is not None
    clock.advance(site.timeOut - 1)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
