"""Metrics of a real server over real backends: counters move as events flow."""

from __future__ import annotations

import gc
import json
import time

import pika
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent

from tests.backends import Pki, PostgresServer, RabbitMQServer, free_port
from tests.browser import Browser
from tests.in_process_server import start_server
from tests.publishing import found_contract
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_subscriber
from tests.test_end_to_end import CurlStream
from tests.test_metrics import read_body
from tests.waiting import bounded, wait_for


@pytest.fixture
def metrics_environ(tls_environ: dict[str, str]) -> dict[str, str]:
    """``tls_environ`` with a metrics port the test knows and a small message limit."""
    return {**tls_environ, "SSE_MAX_MESSAGE_BYTES": "2000", "SSE_METRICS_PORT": str(free_port())}


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await bounded(
        Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
    )
    text = (await read_body(response)).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _publish_with_timestamp(port: int, queue: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            properties = pika.BasicProperties(timestamp=int(time.time()))
            channel.basic_publish("", queue, body, properties, mandatory=True)
    finally:
        connection.close()


@pytest_twisted.ensureDeferred
async def test_counters_move_and_gauges_follow_the_streams_as_events_flow(
    metrics_environ: dict[str, str],
    pki: Pki,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    server = await start_server(metrics_environ)
    port = int(metrics_environ["SSE_METRICS_PORT"])
    browser = Browser(pki.ca_certificate)
    curl = None
    try:
        before = await scrape(port)
        assert before[("sse_open_streams", (("protocol", "h1"),))] == 0
        assert before[("sse_backend_up", (("backend", "rabbitmq"),))] == 1

        userid, token = add_subscriber(postgres_tls)
        url = server.subscribe_url(new_uuid(), userid, token)
        _, first_tab = await browser.open(url)
        _, second_tab = await browser.open(url)
        curl = CurlStream()
        arguments = ["curl", "-sS", "-N", "--http2", "--cacert", str(pki.ca_certificate), url]
        process = reactor.spawnProcess(curl, "/usr/bin/curl", arguments, env={})  # type: ignore[attr-defined]
        await wait_for(lambda: len(server.service.registry) == 3, "three streams")
        refused = await browser.get(server.subscribe_url(new_uuid(), userid, new_uuid()))
        await browser.read_body(refused)
        malformed = await browser.get(server.base_url + "/subscribe/x/y/z")
        await browser.read_body(malformed)

        gauges = await scrape(port)
        assert gauges[("sse_open_streams", (("protocol", "h1"),))] == 2
        assert gauges[("sse_open_streams", (("protocol", "h2"),))] == 1

        queue = server.config.rabbitmq_queue_name
        await bounded(
            deferToThread(
                _publish_with_timestamp,
                rabbitmq_tls.amqp_port,
                queue,
                [b"{not json", b"x" * 3000, json.dumps(found_contract(userid)).encode()],
            )
        )
        await first_tab.next_event()
        await second_tab.next_event()
        await bounded(curl.first_event)

        after = await scrape(port)
        assert after[("sse_messages_consumed_total", ())] == 3
        assert after[("sse_events_delivered_total", ())] == 3
        assert after[("sse_messages_skipped_total", (("reason", "not_json"),))] == 1
        assert after[("sse_messages_skipped_total", (("reason", "too_large"),))] == 1
        assert after[("sse_subscribes_total", (("outcome", "ok"),))] == 3
        assert after[("sse_subscribes_total", (("outcome", "forbidden"),))] == 1
        assert after[("sse_subscribes_total", (("outcome", "bad_request"),))] == 1
        assert after[("sse_publish_to_write_seconds_count", ())] == 1
        assert after[("sse_stream_offset", ())] >= 2

        process.signalProcess("TERM")
        await bounded(curl.ended)
        await browser.close_all()
        await wait_for(lambda: len(server.service.registry) == 0, "streams closed")
        closed = await scrape(port)
        assert closed[("sse_open_streams", (("protocol", "h1"),))] == 0
        assert closed[("sse_open_streams", (("protocol", "h2"),))] == 0
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_reactor_lag_and_collection_pauses_are_served_as_histograms(
    metrics_environ: dict[str, str], postgres_tls: PostgresServer, rabbitmq_tls: RabbitMQServer
) -> None:
    server = await start_server(metrics_environ)
    port = int(metrics_environ["SSE_METRICS_PORT"])
    try:
        # Scrape until the tick (every 50 ms) has been measured again.
        ticks = [(await scrape(port))[("sse_reactor_lag_seconds_count", ())]]
        while ticks[-1] == ticks[0]:
            ticks.append((await scrape(port))[("sse_reactor_lag_seconds_count", ())])
        before = await scrape(port)
        gc.collect()  # the server runs in this process: its collector is ours
        after = await scrape(port)
    finally:
        await server.stop()
    full = ("sse_gc_pause_seconds_count", (("generation", "2"),))
    assert after[full] > before[full]
    for generation in ("0", "1", "2"):
        labels = (("generation", generation), ("le", "0.0005"))
        assert ("sse_gc_pause_seconds_bucket", labels) in after
    lag_buckets = [key for key in after if key[0] == "sse_reactor_lag_seconds_bucket"]
    assert ("le", "1.0") in {label for _, labels in lag_buckets for label in labels}
    assert after[("sse_reactor_lag_seconds_bucket", (("le", "+Inf"),))] >= ticks[-1]
