"""The whole path over real sockets and real TLS: browser, server, PostgreSQL and RabbitMQ.

The server runs on the test reactor against a private PostgreSQL (ssl=on, verify-full) and a
private RabbitMQ (amqps with a client certificate); each test has its own stream queue.
"""

from __future__ import annotations

import json
import socket
import ssl
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.backends import Pki, PostgresServer, RabbitMQServer
from tests.browser import Browser
from tests.in_process_server import RunningServer, start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.sse_parser import EventParser
from tests.subscribers import add_subscriber
from tests.waiting import bounded, wait_for


@pytest_twisted.async_yield_fixture
async def server(tls_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    running = await start_server(tls_environ)
    yield running
    await running.stop()


async def send(rabbitmq: RabbitMQServer, server: RunningServer, *messages: Any) -> None:
    await publish(rabbitmq.amqp_port, server.config.rabbitmq_queue_name, *messages)


@pytest_twisted.ensureDeferred
async def test_every_tab_of_a_user_receives_the_message_and_no_one_else_does(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    alice, alice_token = add_subscriber(postgres_tls)
    bob, bob_token = add_subscriber(postgres_tls)
    topic = new_uuid()
    response, first_tab = await browser.open(server.subscribe_url(topic, alice, alice_token))
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    _, second_tab = await browser.open(server.subscribe_url(new_uuid(), alice, alice_token))
    _, bobs_tab = await browser.open(server.subscribe_url(topic, bob, bob_token))
    await wait_for(lambda: len(server.service.registry) == 3, "three streams registered")

    await send(rabbitmq_tls, server, found_contract(alice), found_contract(bob, filename="b.pdf"))

    first_event, second_event = [await tab.next_event() for tab in (first_tab, second_tab)]
    for event in (first_event, second_event):
        assert json.loads(event["data"]) == found_contract(alice)
    # One message, one stream offset: both tabs carry the same id.
    assert first_event["id"] == second_event["id"]
    bobs_event = await bobs_tab.next_event()
    # Bob's message was published right after Alice's on one ordered stream: had hers reached
    # Bob, it would have arrived first; its id is the next offset.
    assert json.loads(bobs_event["data"])["filename"] == "b.pdf"
    assert int(bobs_event["id"]) == int(first_event["id"]) + 1
    assert [len(tab.received) for tab in (first_tab, second_tab, bobs_tab)] == [1, 1, 1]


@pytest_twisted.ensureDeferred
async def test_a_message_with_a_topic_reaches_only_the_streams_on_that_topic(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    userid, token = add_subscriber(postgres_tls)
    news, alerts = new_uuid(), new_uuid()
    _, news_tab = await browser.open(server.subscribe_url(news, userid, token))
    _, alerts_tab = await browser.open(server.subscribe_url(alerts, userid, token))
    await wait_for(lambda: len(server.service.registry) == 2, "two streams registered")

    await send(
        rabbitmq_tls,
        server,
        found_contract(userid, topic=news, filename="news.pdf"),
        found_contract(userid, topic=alerts, filename="alert.pdf"),
    )

    assert json.loads((await news_tab.next_event())["data"])["filename"] == "news.pdf"
    assert json.loads((await alerts_tab.next_event())["data"])["filename"] == "alert.pdf"
    assert len(news_tab.received) == 1


@pytest_twisted.ensureDeferred
async def test_invalid_messages_are_skipped_and_the_next_one_still_arrives(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    userid, token = add_subscriber(postgres_tls)
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await wait_for(lambda: len(server.service.registry) == 1, "stream registered")

    await send(
        rabbitmq_tls,
        server,
        b"{not json",
        b"\xff\xfe",
        found_contract(userid, type="unknown"),
        found_contract(userid, finished="yes"),
        found_contract(userid, filename="good.pdf"),
    )

    event = await tab.next_event()
    assert json.loads(event["data"])["filename"] == "good.pdf"
    assert len(tab.received) == 1


@pytest_twisted.ensureDeferred
async def test_heartbeat_comments_keep_an_idle_stream_alive(
    tls_environ: dict[str, str], browser: Browser, postgres_tls: PostgresServer
) -> None:
    server = await start_server({**tls_environ, "SSE_HEARTBEAT_SECONDS": "0.2"})
    try:
        userid, token = add_subscriber(postgres_tls)
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        await wait_for(lambda: tab.parser.comments.count("keep-alive") >= 2, "two heartbeats")
        assert tab.parser.comments[0] == "connected"
        assert tab.received == []
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_closed_tab_leaves_the_server_at_once(
    server: RunningServer, browser: Browser, postgres_tls: PostgresServer
) -> None:
    userid, token = add_subscriber(postgres_tls)
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await wait_for(lambda: len(server.service.registry) == 1, "stream registered")
    tab.close()
    await wait_for(lambda: len(server.service.registry) == 0, "stream removed")


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/subscribe/not-a-uuid/{userid}/{token}", 400, b"topic is not a lowercase v4 UUID\n"),
        ("/subscribe/{topic}/{userid}", 400, b"missing nonce: expected"),
        ("/subscribe/{topic}/{userid}/{other}", 403, b"unknown subscriber\n"),
        ("/elsewhere", 404, b"not found\n"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_refusal_has_its_status_and_a_short_reason(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    path: str,
    status: int,
    reason: bytes,
) -> None:
    userid, token = add_subscriber(postgres_tls)
    url = server.base_url + path.format(
        topic=new_uuid(), userid=userid, token=token, other=new_uuid()
    )
    response = await browser.get(url)
    assert response.code == status
    assert (await browser.read_body(response)).startswith(reason)
    assert len(server.service.registry) == 0


@pytest_twisted.ensureDeferred
async def test_a_post_is_405(server: RunningServer, pki: Pki) -> None:
    port = server.port
    context = ssl.create_default_context(cafile=str(pki.ca_certificate))
    status_line = await bounded(
        reactor_thread(_raw_request, context, port, b"POST /subscribe/a/b/c HTTP/1.1\r\n")
    )
    assert status_line.startswith(b"HTTP/1.1 405 ")


def _raw_request(context: ssl.SSLContext, port: int, request_line: bytes) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        connection.sendall(request_line + b"Host: localhost\r\nContent-Length: 0\r\n\r\n")
        return connection.recv(4096).split(b"\r\n", 1)[0]


def reactor_thread(function: Any, *arguments: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(function, *arguments)


def _negotiate(context: ssl.SSLContext, port: int) -> tuple[str | None, str | None]:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        return connection.version(), connection.selected_alpn_protocol()


@pytest_twisted.ensureDeferred
async def test_tls_offers_http2_by_alpn_and_refuses_tls_1_1(
    server: RunningServer, pki: Pki
) -> None:
    port = server.port
    modern = ssl.create_default_context(cafile=str(pki.ca_certificate))
    modern.set_alpn_protocols(["h2", "http/1.1"])
    version, protocol = await reactor_thread(_negotiate, modern, port)
    assert protocol == "h2"
    assert version in ("TLSv1.2", "TLSv1.3")
    http11 = ssl.create_default_context(cafile=str(pki.ca_certificate))
    http11.set_alpn_protocols(["http/1.1"])
    assert (await reactor_thread(_negotiate, http11, port))[1] == "http/1.1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.create_default_context(cafile=str(pki.ca_certificate))
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    # Let this client really offer TLS 1.0/1.1, so that the refusal is the server's.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(ssl.SSLError) as refused:
        await reactor_thread(_negotiate, old, port)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"


class CurlStream(ProcessProtocol):
    """A curl process reading an event stream; fires ``first_event`` with the first event."""

    def __init__(self) -> None:
        self.parser = EventParser()
        self.first_event: Deferred[dict[str, str]] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stderr = b""

    def outReceived(self, data: bytes) -> None:
        events = self.parser.feed(data)
        if events and not self.first_event.called:
            self.first_event.callback(events[0])

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_curl_over_http2_receives_an_event(
    server: RunningServer, pki: Pki, postgres_tls: PostgresServer, rabbitmq_tls: RabbitMQServer
) -> None:
    userid, token = add_subscriber(postgres_tls)
    curl = CurlStream()
    url = server.subscribe_url(new_uuid(), userid, token)
    arguments = ["curl", "-sS", "-N", "--http2", "--cacert", str(pki.ca_certificate), url]
    process = reactor.spawnProcess(curl, "/usr/bin/curl", arguments, env={})  # type: ignore[attr-defined]
    try:
        await wait_for(lambda: len(server.service.registry) == 1, "curl's stream registered")
        [stream] = list(server.service.registry)
        assert stream.request.clientproto == b"HTTP/2"
        await send(rabbitmq_tls, server, found_contract(userid))
        event = await bounded(curl.first_event)
        assert json.loads(event["data"]) == found_contract(userid)
    finally:
        process.signalProcess("TERM")
        await bounded(curl.ended)


@pytest_twisted.ensureDeferred
async def test_a_broker_restart_keeps_streams_open_and_delivery_resumes(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    userid, token = add_subscriber(postgres_tls)
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await send(rabbitmq_tls, server, found_contract(userid, filename="before.pdf"))
    before = await tab.next_event()

    await reactor_thread(rabbitmq_tls.stop_app)
    await wait_for(lambda: not server.service.consumer.consuming, "consumer noticed the outage")
    await reactor_thread(rabbitmq_tls.start_app)
    await send(rabbitmq_tls, server, found_contract(userid, filename="after.pdf"))

    after = await tab.next_event(seconds=60)
    assert json.loads(after["data"])["filename"] == "after.pdf"
    assert int(after["id"]) > int(before["id"])
    assert not tab.closed.called


@pytest_twisted.ensureDeferred
async def test_messages_published_while_the_consumer_was_away_still_arrive(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    userid, token = add_subscriber(postgres_tls)
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await send(rabbitmq_tls, server, found_contract(userid, filename="1.pdf"))
    await tab.next_event()

    consumer = server.service.consumer
    await consumer.stopService()
    await send(
        rabbitmq_tls,
        server,
        found_contract(userid, filename="2.pdf"),
        found_contract(userid, filename="3.pdf"),
    )
    consumer.startService()

    names = [json.loads((await tab.next_event())["data"])["filename"] for _ in range(2)]
    assert names == ["2.pdf", "3.pdf"]
    ids = [int(event["id"]) for event in tab.received]
    assert ids == sorted(set(ids))


@pytest_twisted.ensureDeferred
async def test_a_database_restart_is_followed_by_a_successful_subscribe(
    server: RunningServer, browser: Browser, postgres_tls: PostgresServer
) -> None:
    userid, token = add_subscriber(postgres_tls)
    url = server.subscribe_url(new_uuid(), userid, token)
    await reactor_thread(postgres_tls.stop)
    try:
        response = await browser.get(url)
        # Down: a 200 that ends at once with a retry hint, so EventSource comes back.
        assert response.code == 200
        parser = EventParser()
        parser.feed(await browser.read_body(response))
        assert parser.retry == 500
    finally:
        await reactor_thread(postgres_tls.start)

    # As EventSource does: reconnect after the retry delay until the stream opens.
    for _attempt in range(100):
        _, tab = await browser.open(url)
        await wait_for(
            lambda tab=tab: "connected" in tab.parser.comments or tab.closed.called, "an answer"
        )
        if "connected" in tab.parser.comments:
            break
        await deferLater(reactor, server.config.retry_milliseconds / 1000, lambda: None)
    else:
        raise AssertionError("no successful subscribe after PostgreSQL came back")
    await wait_for(lambda: len(server.service.registry) == 1, "stream registered")


@pytest_twisted.ensureDeferred
async def test_accepted_connections_give_up_on_a_peer_that_stops_acknowledging(
    server: RunningServer,
) -> None:
    port = await server.service.listener.listening
    # Accepted sockets inherit the listening socket's TCP_USER_TIMEOUT (Linux).
    timeout = port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert timeout == server.config.tcp_user_timeout_seconds * 1000 == 45_000
