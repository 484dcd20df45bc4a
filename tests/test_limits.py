"""Limits with precise answers: 429 for streams, 431 for request heads, 408 for slowloris,
400 for junk pipelined after a request, and TCP backpressure for bytes pipelined behind an
open stream (HTTP/1.1 answers pipelined requests in order, so nothing behind a stream is
parsed until the stream ends; it must not be buffered without bound either).

Each test runs a real server on the test reactor against the machine's plaintext
PostgreSQL and RabbitMQ (``plaintext_environ``), over real TLS; the raw-socket clients run
in threads. The HTTP/1.1 channel's cases (each kind of oversized head, each kind of junk,
the deadline to the tick, the abort of a client that does not read) are tested in memory
in tests/test_channel_limits.py: here is one real test per behaviour, with wall-clock
bounds only as wide as tell the behaviour from its absence.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h2.connection
import h2.exceptions
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent

from tests.backends import Pki
from tests.browser import Browser
from tests.in_process_server import socket_transport, start_server
from tests.logs import failures, lines_with
from tests.memory_http import decode_chunks, responses
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.sse_parser import EventParser
from tests.subscribers import add_local_subscriber
from tests.waiting import bounded, wait_for


@pytest.fixture
def plaintext_environ(plaintext_environ: dict[str, str]) -> dict[str, str]:
    """The local plaintext backends; logs to stdout only (an in-process server never closes
    its daily log file)."""
    return {name: value for name, value in plaintext_environ.items() if name != "SSE_LOGS_DIR"}


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
        await wait_for(lambda: server.service.registry.count_of(userid) <= 1, "tab not freed")
        again, _ = await browser.open(urls[2])
        assert again.code == 200
    finally:
        await browser.close_all()
        await server.stop()


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


@pytest_twisted.ensureDeferred
async def test_an_oversized_request_head_gets_431_with_a_reason_and_the_server_serves_on(
    plaintext_environ: dict[str, str], pki: Pki
) -> None:
    server = await start_server(plaintext_environ)
    try:
        connect = _tls(pki)
        head = b"".join(b"X-%d: %s\r\n" % (n, b"b" * 90) for n in range(95))
        request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n"
        # Read to a clean end of TLS: an abort (the fate of a client that does not read)
        # would be a reset, and the read would fail.
        answer = await bounded(deferToThread(_send_head, connect, server.port, request))
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert answer.endswith(b"\r\n\r\nrequest headers too large\n")
        fine = await bounded(
            deferToThread(
                _send_head,
                connect,
                server.port,
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
        slow: Any = deferToThread(_slowloris, connect, server.port)
        response, _ = await browser.open(
            server.subscribe_url(
                new_uuid(), *add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
            )
        )
        assert response.code == 200
        received, answered, ended = await bounded(slow)
        assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert received.endswith(b"request headers not received in time\n")
        # Not before the deadline; and cut, where the old server let the dribble run as
        # long as bytes came (the client gives up after 15 s). The deadline to the tick is
        # tested in memory.
        assert answered > 0.9
        assert ended < 12
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
    plaintext_environ: dict[str, str], browser: Browser, pki: Pki
) -> None:
    server = await start_server(plaintext_environ)
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        port = server.port
        tally = await deferToThread(_flood_http2, port, pki.ca_certificate, 1000)
        # h2 advertises at most 100 concurrent streams: the flood is refused, not served.
        assert tally["responses"] < 1000
        assert tally["goaway"] or tally["resets"] or tally["closed"]
        queue = server.config.rabbitmq_queue_name
        await publish(server.config.rabbitmq_port, queue, found_contract(userid))
        assert json.loads((await tab.next_event())["data"]) == found_contract(userid)
    finally:
        await server.stop()


def _subscribe_request(topic: str, userid: str, token: str) -> bytes:
    return b"GET /subscribe/%s/%s/%s HTTP/1.1\r\nHost: localhost\r\n\r\n" % (
        topic.encode(),
        userid.encode(),
        token.encode(),
    )


_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


class _RawEventStream:
    """An HTTP/1.1 event stream read off a raw TLS socket: the response head, then the
    chunked body, decoded strictly (a byte out of place in the framing is an error), and
    the events and comments a browser would see in it."""

    def __init__(self, connection: ssl.SSLSocket) -> None:
        self.connection = connection
        self.received = b""
        self.head = b""
        self.body = b""
        self.parser = EventParser()
        self.events: list[dict[str, str]] = []
        self._unparsed = b""

    def read_until(self, done: Callable[[], bool]) -> None:
        """Read until ``done()``; the socket's timeout bounds each read."""
        while not done():
            data = self.connection.recv(65536)
            if not data:
                raise ConnectionError("the server ended the stream")
            self.received += data
            self._feed(data)

    def _feed(self, data: bytes) -> None:
        self._unparsed += data
        if not self.head:
            head, separator, rest = self._unparsed.partition(b"\r\n\r\n")
            if not separator:
                return
            self.head, self._unparsed = head + separator, rest
        body, self._unparsed = decode_chunks(self._unparsed)
        self.body += body
        self.events += self.parser.feed(body)


def _raw_connection(
    pki: Pki, port: int, send_buffer: int | None = None, receive_buffer: int | None = None
) -> ssl.SSLSocket:
    """An HTTP/1.1 TLS connection; socket buffer sizes are set before connecting, so that
    the kernel neither autotunes them nor uses them to size the TCP window."""
    context = ssl.create_default_context(cafile=str(pki.ca_certificate))
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.socket()
    if send_buffer is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    if receive_buffer is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    return context.wrap_socket(raw, server_hostname="localhost")


def _open_stream(connection: ssl.SSLSocket, data: bytes) -> _RawEventStream:
    """Send ``data`` in one write; read until the stream says it is connected."""
    connection.sendall(data)
    stream = _RawEventStream(connection)
    stream.read_until(lambda: "connected" in stream.parser.comments)
    return stream


def _flood(connection: ssl.SSLSocket, total: int, stall_seconds: float) -> int:
    """Send up to ``total`` bytes of junk; stop when the kernel has accepted nothing for
    ``stall_seconds``. Return how many bytes were sent."""
    block = (b"\x00\xff garbage\r\n" * 5000)[:65536]
    connection.settimeout(stall_seconds)
    sent = 0
    try:
        while sent < total:
            sent += connection.send(block[: total - sent])
    except TimeoutError:
        pass
    finally:
        connection.settimeout(10)
    return sent


@pytest_twisted.ensureDeferred
async def test_junk_pipelined_after_requests_gets_400_after_their_answers_then_the_close(
    plaintext_environ: dict[str, str],
    pki: Pki,
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    server = await start_server(plaintext_environ)
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        _, other = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        # Two good requests, the junk, and a good request after it, in one write.
        junk = b"\x00\xff garbage\r\n\r\n"
        pipelined = _HEALTHZ + b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n" + junk + _HEALTHZ
        answer = await bounded(deferToThread(_send_head, _tls(pki), server.port, pipelined))
        answered, rest = responses(answer)
        # The junk gets a 400 with its reason, then the close (the read ended at EOF): the
        # request after it is never answered.
        assert answered == [
            (b"HTTP/1.1 200 OK", b"ok\n"),
            (b"HTTP/1.1 404 Not Found", b"not found\n"),
            (b"HTTP/1.1 400 Bad Request", b"malformed HTTP request\n"),
        ]
        assert rest == b""
        assert "refused a request: malformed HTTP request" in lines_with(log_events, "refused")
        await publish(
            server.config.rabbitmq_port, server.config.rabbitmq_queue_name, found_contract(userid)
        )
        assert json.loads((await other.next_event())["data"]) == found_contract(userid)
        assert failures(log_events) == []
    finally:
        await browser.close_all()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_requests_pipelined_behind_an_open_stream_are_never_answered_nor_streamed(
    plaintext_environ: dict[str, str],
    pki: Pki,
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    server = await start_server(plaintext_environ)
    registry = server.service.registry
    connection: ssl.SSLSocket | None = None
    try:
        database = plaintext_environ["SSE_POSTGRES_DB_NAME"]
        alice, alice_token = add_local_subscriber(database)
        bob, bob_token = add_local_subscriber(database)
        _, bobs_tab = await browser.open(server.subscribe_url(new_uuid(), bob, bob_token))
        pipelined = (
            _subscribe_request(new_uuid(), alice, alice_token)
            + _HEALTHZ
            + _subscribe_request(new_uuid(), bob, bob_token)
            + b"data: forged\r\n\r\n"
            + b"\x00\xff garbage\r\n\r\n"
        )
        connection = await bounded(deferToThread(_raw_connection, pki, server.port))
        alices_stream = await bounded(deferToThread(_open_stream, connection, pipelined))
        assert alices_stream.head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nContent-Type: text/event-stream; charset=utf-8\r\n" in alices_stream.head
        assert b"\r\nTransfer-Encoding: chunked\r\n" in alices_stream.head
        assert (registry.count_of(alice), registry.count_of(bob)) == (1, 1)

        # Bob's events come before Alice's second one: a stream that got Alice's second
        # event would have got any copy of the first, or any of Bob's, before it.
        sent = [
            found_contract(alice, n=1),
            found_contract(bob, n=1),
            found_contract(alice, n=2),
            found_contract(bob, n=2),
        ]
        await publish(server.config.rabbitmq_port, server.config.rabbitmq_queue_name, *sent)
        await bounded(
            deferToThread(alices_stream.read_until, lambda: len(alices_stream.events) == 2)
        )
        await bobs_tab.next_event()
        await bobs_tab.next_event()

        assert [json.loads(event["data"]) for event in alices_stream.events] == sent[0::2]
        assert [json.loads(event["data"]) for event in bobs_tab.received] == sent[1::2]
        assert int(alices_stream.events[0]["id"]) < int(alices_stream.events[1]["id"])
        assert [c for c in alices_stream.parser.comments if c != "keep-alive"] == ["connected"]
        # One response on the connection, and none of the pipelined bytes in it.
        assert alices_stream.received.count(b"HTTP/1.1 ") == 1
        for pipelined_text in (b"healthz", b"subscribe", b"forged", b"garbage", b"\x00"):
            assert pipelined_text not in alices_stream.body
        # Bob's pipelined subscribe was never served: Bob still has his one tab.
        assert (registry.count_of(alice), registry.count_of(bob)) == (1, 1)

        connection.close()
        await wait_for(lambda: registry.count_of(alice) == 0, "Alice's stream is still open")
        assert registry.count_of(bob) == 1
        assert failures(log_events) == []
    finally:
        if connection is not None:
            connection.close()
        await browser.close_all()
        await server.stop()


# The channel reads 16 KiB of pipelined bytes before it pauses the transport (Twisted's
# HTTPChannel._optimisticEagerReadSize, which LimitedHTTPChannel also keeps to); the read
# that crossed it is delivered whole: up to 64 KiB from the socket, plus what completes a
# 16 KiB TLS record begun in the read before.
_MOST_PIPELINED_BYTES_HELD = 16384 + 65536 + 16384


@pytest_twisted.ensureDeferred
async def test_a_pipelined_flood_behind_a_stream_whose_client_does_not_read_is_held_back_by_tcp(
    plaintext_environ: dict[str, str],
    pki: Pki,
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    server = await start_server(
        {
            **plaintext_environ,
            # A stream closed by its client is noticed by the next write once reads are paused.
            "SSE_HEARTBEAT_SECONDS": "0.5",
            # Room for the megabytes that fill the transport of a client not reading.
            "SSE_MAX_BUFFER_BYTES": str(64 * 1024 * 1024),
        }
    )
    registry = server.service.registry
    queue = server.config.rabbitmq_queue_name
    connection: ssl.SSLSocket | None = None
    try:
        database = plaintext_environ["SSE_POSTGRES_DB_NAME"]
        alice, alice_token = add_local_subscriber(database)
        bob, bob_token = add_local_subscriber(database)
        _, bobs_tab = await browser.open(server.subscribe_url(new_uuid(), bob, bob_token))
        connection = await bounded(
            deferToThread(
                _raw_connection,
                pki,
                server.port,
                send_buffer=256 * 1024,
                receive_buffer=4096,
            )
        )
        alices_stream = await bounded(
            deferToThread(
                _open_stream, connection, _subscribe_request(new_uuid(), alice, alice_token)
            )
        )
        (stream,) = registry.streams_of(alice)
        channel = stream.request.channel
        published: list[dict[str, Any]] = []
        # Fill the connection until the server waits for it to drain: the stream is
        # paused, with a megabyte more than the transport would take before resuming.
        # Twisted skips its own pause of reads in this state (LimitedHTTPChannel adds it).
        for batch in range(12):
            if stream.paused and stream.unsent_bytes > 1024 * 1024:
                break
            messages = [
                found_contract(alice, n=n, pad="p" * 50_000)
                for n in range(20 * batch, 20 * batch + 20)
            ]
            await publish(server.config.rabbitmq_port, queue, *messages)
            published += messages
        assert stream.paused and stream.unsent_bytes > 1024 * 1024

        total = 16 * 1024 * 1024
        sent = await bounded(deferToThread(_flood, connection, total, 2.0))
        # The sender was stopped by full socket buffers (about 0.5 MB here: its send buffer,
        # the server's receive buffer, and what the server read), not by running out of junk...
        assert sent < 2 * 1024 * 1024
        # ...because the server stopped reading, with a bounded part of it read: the rest
        # waits in the kernels' buffers.
        tcp = socket_transport(channel.transport)
        await wait_for(lambda: tcp not in reactor.getReaders(), "the server never stopped reading")
        assert 0 < sum(map(len, channel._dataBuffer)) <= _MOST_PIPELINED_BYTES_HELD

        # The stream is intact: every event, in order, once, and none of the junk.
        marker = found_contract(alice, n="last")
        await publish(server.config.rabbitmq_port, queue, marker, found_contract(bob))
        expected = [*published, marker]
        await bounded(
            deferToThread(
                alices_stream.read_until, lambda: len(alices_stream.events) == len(expected)
            )
        )
        assert [json.loads(event["data"]) for event in alices_stream.events] == expected
        assert b"garbage" not in alices_stream.body
        assert json.loads((await bobs_tab.next_event())["data"]) == found_contract(bob)

        connection.close()
        await wait_for(lambda: registry.count_of(alice) == 0, "Alice's stream is still open")
        assert registry.count_of(bob) == 1
        assert failures(log_events) == []
    finally:
        if connection is not None:
            connection.close()
        await browser.close_all()
        await server.stop()
