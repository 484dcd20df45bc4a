"""Limits with precise answers: 429 for streams, 431 for request heads, 408 for slowloris.

Each test runs a real server on the test reactor against the machine's plaintext
PostgreSQL and RabbitMQ (``plaintext_environ``); the raw-socket clients run in threads.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.connection
import h2.exceptions
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.backends import Pki, PostgresServer, RabbitMQServer
from tests.harness import (
    Browser,
    RunningServer,
    add_local_subscriber,
    add_subscriber,
    bounded,
    found_contract,
    new_uuid,
    publish,
    start_server,
)


@pytest.fixture
def plaintext_environ(plaintext_environ: dict[str, str]) -> dict[str, str]:
    """The local plaintext backends; logs to stdout only (an in-process server never closes
    its daily log file)."""
    return {name: value for name, value in plaintext_environ.items() if name != "SSE_LOGS_DIR"}


def _port(server: RunningServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def _tls(pki: Pki) -> Callable[[int], ssl.SSLSocket]:
    context = ssl.create_default_context(cafile=str(pki.ca_certificate))
    context.set_alpn_protocols(["http/1.1"])

    def connect(port: int) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        return context.wrap_socket(raw, server_hostname="localhost")

    return connect


def _read_all(connection: ssl.SSLSocket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def _send_head(connect: Callable[[int], ssl.SSLSocket], port: int, head: bytes) -> bytes:
    """Send ``head`` and return every byte the server answers before it closes."""
    with connect(port) as connection:
        connection.sendall(head)
        return _read_all(connection)


@pytest_twisted.ensureDeferred
async def test_a_user_over_the_per_user_limit_gets_429_while_others_are_served(
    plaintext_environ: dict[str, str], browser: Browser
) -> None:
    server = await start_server({**plaintext_environ, "SSE_MAX_STREAMS_PER_USER": "2"})
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        urls = [server.subscribe_url(new_uuid(), userid, token) for _ in range(3)]
        first, first_stream = await browser.open(urls[0])
        second, _ = await browser.open(urls[1])
        assert (first.code, second.code) == (200, 200)
        refused = await browser.get(urls[2])
        assert refused.code == 429
        assert refused.headers.getRawHeaders(b"retry-after") == [b"3"]  # the retry delay, 3000 ms
        assert await browser.read_body(refused) == b"too many open streams for this user\n"
        other, _ = await browser.open(
            server.subscribe_url(
                new_uuid(), *add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
            )
        )
        assert other.code == 200
        # A closed tab frees its place.
        first_stream.close()
        await bounded(first_stream.closed)
        while server.service.registry.count_of(userid) > 1:
            await deferLater_tick()
        again, _ = await browser.open(urls[2])
        assert again.code == 200
    finally:
        await browser.close_all()
        await server.stop()


async def deferLater_tick() -> None:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_server_at_its_stream_limit_answers_429_to_anyone(
    plaintext_environ: dict[str, str], browser: Browser
) -> None:
    server = await start_server({**plaintext_environ, "SSE_MAX_STREAMS": "2"})
    try:
        for _ in range(2):
            response, _ = await browser.open(
                server.subscribe_url(
                    new_uuid(), *add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
                )
            )
            assert response.code == 200
        refused = await browser.get(
            server.subscribe_url(
                new_uuid(), *add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
            )
        )
        assert refused.code == 429
        assert await browser.read_body(refused) == b"too many open streams on this server\n"
        assert len(server.service.registry) == 2
    finally:
        await browser.close_all()
        await server.stop()


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"X-Big: " + b"a" * 9000 + b"\r\n", b"request header line too long"),
        (
            b"".join(b"X-%d: %s\r\n" % (n, b"b" * 90) for n in range(95)),
            b"request headers too large",
        ),
        (b"".join(b"X-%d: c\r\n" % n for n in range(150)), b"too many request headers"),
    ],
    ids=["one-huge-header", "headers-over-the-byte-limit", "too-many-headers"],
)
@pytest_twisted.ensureDeferred
async def test_an_oversized_request_head_gets_431_with_a_reason_and_the_server_serves_on(
    plaintext_environ: dict[str, str], pki: Pki, head: bytes, reason: bytes
) -> None:
    server = await start_server(plaintext_environ)
    try:
        connect = _tls(pki)
        request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n"
        answer = await bounded(deferToThread(_send_head, connect, _port(server), request))
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert answer.endswith(b"\r\n\r\n" + reason + b"\n")
        fine = await bounded(
            deferToThread(
                _send_head,
                connect,
                _port(server),
                b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )
        )
        assert fine.startswith(b"HTTP/1.1 200 ")
    finally:
        await server.stop()


def _slowloris(connect: Callable[[int], ssl.SSLSocket], port: int) -> tuple[bytes, float, float]:
    """Dribble a never-ending request head, a byte every 0.2 s; return what the server
    answered, after how long it answered, and after how long the connection ended."""
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        connection.settimeout(0.2)
        received = b""
        answered = float("inf")
        while time.monotonic() - started < 15:
            try:
                connection.sendall(b"X")
            except OSError:
                break
            try:
                chunk = connection.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
            answered = min(answered, time.monotonic() - started)
        return received, answered, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_a_slowloris_head_is_cut_at_the_deadline_while_others_are_served(
    plaintext_environ: dict[str, str], pki: Pki, browser: Browser
) -> None:
    server = await start_server({**plaintext_environ, "SSE_HEADER_TIMEOUT_SECONDS": "1"})
    try:
        connect = _tls(pki)
        slow: Any = deferToThread(_slowloris, connect, _port(server))
        response, _ = await browser.open(
            server.subscribe_url(
                new_uuid(), *add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
            )
        )
        assert response.code == 200
        received, answered, ended = await bounded(slow)
        assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert received.endswith(b"request headers not received in time\n")
        assert 0.9 < answered < 3
        # The dribbling client never reads to the end of TLS: it is cut after the grace.
        assert ended < 1 + 5 + 2
        assert len(server.service.registry) == 1
    finally:
        await browser.close_all()
        await server.stop()


def _flood_http2(port: int, ca: Path, streams: int) -> dict[str, int]:
    """Open ``streams`` HTTP/2 streams at once on one connection (past the server's
    advertised limit: the client never reads its settings first); tally the answers."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    tally = {"responses": 0, "resets": 0, "goaway": 0, "closed": 0}
    raw = socket.create_connection(("127.0.0.1", port))
    with context.wrap_socket(raw, server_hostname="localhost") as connection:
        client = h2.connection.H2Connection()
        client.initiate_connection()
        for number in range(streams):
            client.send_headers(
                2 * number + 1,
                [
                    (":method", "GET"),
                    (":path", "/healthz"),
                    (":scheme", "https"),
                    (":authority", "localhost"),
                ],
                end_stream=True,
            )
        connection.sendall(client.data_to_send())
        connection.settimeout(10)
        while tally["responses"] + tally["resets"] < streams:
            data = connection.recv(65536)
            if not data:
                tally["closed"] = 1
                break
            try:
                events = client.receive_data(data)
            except h2.exceptions.ProtocolError:
                break
            for event in events:
                kind = type(event).__name__
                tally["responses"] += kind == "ResponseReceived"
                tally["resets"] += kind == "StreamReset"
                tally["goaway"] += kind == "ConnectionTerminated"
            if tally["goaway"]:
                break
            connection.sendall(client.data_to_send())
    return tally


@pytest_twisted.ensureDeferred
async def test_an_http2_flood_of_streams_is_bounded_and_others_are_still_served(
    tls_environ: dict[str, str],
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    pki: Pki,
) -> None:
    server = await start_server(tls_environ)
    try:
        userid, token = add_subscriber(postgres_tls)
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        port = int(server.base_url.rsplit(":", 1)[1])
        tally = await deferToThread(_flood_http2, port, pki.ca_certificate, 1000)
        # h2 advertises at most 100 concurrent streams: the flood is refused, not served.
        assert tally["responses"] < 1000
        assert tally["goaway"] or tally["resets"] or tally["closed"]
        queue = server.config.rabbitmq_queue_name
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid))
        assert json.loads((await tab.next_event())["data"]) == found_contract(userid)
    finally:
        await server.stop()
