"""The HTTP/1.1 channel's limits, in memory (tests/memory_http.py): 431 for request heads,
408 for heads not complete in time, 400 with a reason for junk, nothing answered behind an
open stream, and reads stopped under a flood pipelined behind one. Time passes only with
``Clock.advance``. The real server over real TLS, one test per behaviour, is in
tests/test_limits.py (and bodies in tests/test_bodies.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from uuid import uuid4

import pytest
from twisted.logger import LogEvent

from sse_twisted._framing import event_frame
from tests.logs import lines_with
from tests.memory_http import MemoryConnection, MemoryServer, decode_chunks, responses
from tests.sse_parser import EventParser

_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"
_OK = (b"HTTP/1.1 200 OK", b"ok\n")
_MALFORMED = (b"HTTP/1.1 400 Bad Request", b"malformed HTTP request\n")


def _subscribe(userid: str) -> bytes:
    path = f"/subscribe/{uuid4()}/{userid}/{uuid4()}".encode()
    return b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _served_healthz(server: MemoryServer) -> bool:
    """Whether a new connection gets its ``/healthz`` answered."""
    other = server.connect("192.0.2.99")
    other.send(_HEALTHZ)
    return responses(other.received) == ([_OK], b"")


_OVERSIZED_HEADS = pytest.mark.parametrize(
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


@_OVERSIZED_HEADS
def test_an_oversized_request_head_gets_431_with_its_reason_then_the_close(
    head: bytes, reason: bytes
) -> None:
    server = MemoryServer()
    connection = server.connect()
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + head + b"\r\n" + _HEALTHZ)
    assert connection.received.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert connection.received.endswith(b"\r\nconnection: close\r\n\r\n" + reason + b"\n")
    # One answer: the request pipelined behind the refused head is never read.
    assert connection.received.count(b"HTTP/1.1 ") == 1
    assert connection.closing and not connection.aborted
    assert server.refused("head_too_large") == 1
    assert _served_healthz(server)


def test_a_request_head_of_exactly_the_limit_is_served_and_one_byte_more_gets_431() -> None:
    server = MemoryServer(max_header_bytes=1024)
    start = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: "
    # Every line of the head counts with its CRLF, the empty line that ends it too.
    padding = 1024 - len(start) - len(b"\r\n\r\n")
    at_the_limit = server.connect()
    at_the_limit.send(start + b"p" * padding + b"\r\n\r\n")
    assert responses(at_the_limit.received) == ([_OK], b"")
    over_it = server.connect()
    over_it.send(start + b"p" * (padding + 1) + b"\r\n\r\n")
    assert over_it.received.startswith(b"HTTP/1.1 431 ")
    assert over_it.received.endswith(b"request headers too large\n")


def _refused(server: MemoryServer) -> MemoryConnection:
    connection = server.connect()
    connection.send(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert connection.received.startswith(b"HTTP/1.1 431 ")
    return connection


def test_a_refused_client_that_does_not_read_its_answer_is_aborted_five_seconds_later() -> None:
    server = MemoryServer()
    connection = _refused(server)
    server.clock.advance(4.9)
    assert connection.closing and not connection.aborted
    server.clock.advance(0.1)
    assert connection.aborted


def test_a_refused_client_that_read_its_answer_is_not_aborted_afterwards() -> None:
    server = MemoryServer()
    connection = _refused(server)
    connection.close()
    server.clock.advance(60)
    assert not connection.aborted


def test_a_head_dribbled_a_byte_at_a_time_gets_408_at_the_deadline_and_not_before() -> None:
    server = MemoryServer(request_timeout=10)
    connection = server.connect()
    connection.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
    # Each byte comes well within any idle timeout: data does not move the deadline.
    for _ in range(19):
        server.clock.advance(0.5)
        connection.send(b"X")
        assert _served_healthz(server)
    assert connection.received == b""
    assert not connection.closing
    server.clock.advance(0.5)
    assert connection.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert connection.received.endswith(b"\r\n\r\nrequest headers not received in time\n")
    assert connection.closing
    assert server.refused("head_too_slow") == 1


def test_the_deadline_runs_from_each_request_s_first_byte_not_between_requests() -> None:
    server = MemoryServer(request_timeout=10)
    connection = server.connect()
    connection.send(_HEALTHZ)
    # Kept alive and idle past the deadline: nothing is refused.
    server.clock.advance(30)
    assert responses(connection.received) == ([_OK], b"")
    assert not connection.closing
    connection.send(b"GET /healthz HTTP/1.1\r\n")
    server.clock.advance(9.9)
    assert responses(connection.received) == ([_OK], b"")
    server.clock.advance(0.1)
    assert connection.received.endswith(b"request headers not received in time\n")


@pytest.mark.parametrize(
    "junk",
    [
        b"\x00\xff garbage\r\n\r\n",
        b"GET /healthz\r\n\r\n",
        b"FROBNICATE /healthz HTTP/1.1\r\nHost: localhost\r\nthis line has no colon\r\n\r\n",
        b"FROBNICATE /healthz HTTP/1.1\r\nContent-Length: lots\r\nX-\x01: ~\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=[
        "binary-garbage",
        "request-line-without-version",
        "bogus-method-and-a-header-line-without-colon",
        "bogus-method-and-a-non-numeric-content-length",
        "chunked-body-with-a-non-hex-size",
    ],
)
def test_junk_pipelined_after_requests_gets_400_after_their_answers_then_the_close(
    junk: bytes, log_events: Sequence[LogEvent]
) -> None:
    server = MemoryServer()
    connection = server.connect()
    connection.send(
        _HEALTHZ + b"GET /nowhere HTTP/1.1\r\nHost: localhost\r\n\r\n" + junk + _HEALTHZ
    )
    # The request after the junk is never answered.
    assert responses(connection.received) == (
        [_OK, (b"HTTP/1.1 404 Not Found", b"not found\n"), _MALFORMED],
        b"",
    )
    assert connection.closing
    assert server.refused("malformed") == 1
    assert lines_with(log_events, "refused a request") == [
        "refused a request: malformed HTTP request"
    ]
    assert _served_healthz(server)


def _stream_of(connection: MemoryConnection) -> tuple[bytes, list[dict[str, str]], bytes]:
    """The head of the one response on ``connection``, the events of its chunked body,
    and the bytes after the body's last complete chunk."""
    head, _, rest = connection.received.partition(b"\r\n\r\n")
    body, unparsed = decode_chunks(rest)
    return head, EventParser().feed(body), body + unparsed


def _deliver(server: MemoryServer, userid: str, offset: int) -> int:
    data = json.dumps({"userid": userid, "n": offset}).encode()
    return server.registry.deliver(userid, None, offset, event_frame(data, offset))


def test_requests_pipelined_behind_an_open_stream_are_never_answered_nor_streamed() -> None:
    server = MemoryServer()
    alice, bob = str(uuid4()), str(uuid4())
    connection = server.connect()
    connection.send(
        _subscribe(alice)
        + _HEALTHZ
        + _subscribe(bob)
        + b"data: forged\r\n\r\n"
        + b"\x00\xff garbage\r\n\r\n"
    )
    assert (server.registry.count_of(alice), server.registry.count_of(bob)) == (1, 0)
    assert (_deliver(server, alice, 1), _deliver(server, bob, 2)) == (1, 0)
    head, events, body = _stream_of(connection)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/event-stream; charset=utf-8\r\n" in head
    assert [json.loads(event["data"]) for event in events] == [{"userid": alice, "n": 1}]
    # One response on the connection, and none of the pipelined bytes in it.
    assert connection.received.count(b"HTTP/1.1 ") == 1
    for pipelined in (b"healthz", b"subscribe", b"forged", b"garbage", b"\x00"):
        assert pipelined not in body
    connection.close()
    assert len(server.registry) == 0


@pytest.mark.parametrize(
    "client_reads", [True, False], ids=["client-reading", "client-not-reading"]
)
def test_a_flood_pipelined_behind_an_open_stream_stops_the_server_reading(
    client_reads: bool,
) -> None:
    server = MemoryServer()
    alice = str(uuid4())
    connection = server.connect()
    connection.send(_subscribe(alice))
    if not client_reads:
        # Twisted skips its own pause of reads in this state (LimitedHTTPChannel adds it).
        connection.client_stops_reading()
    read = (b"\x00\xff garbage\r\n" * 400)[:4096]
    sent = 0
    while connection.reading and sent < 1024 * 1024:
        connection.send(read)
        sent += len(read)
    # Stopped by the read that took the pipelined bytes past Twisted's 16 KiB allowance;
    # a real client's next bytes wait in the kernels' buffers.
    assert not connection.reading
    assert 16384 < sent <= 16384 + len(read)
    # The stream is intact: its events, and none of the junk.
    assert _deliver(server, alice, 1) == 1
    _, events, body = _stream_of(connection)
    assert [json.loads(event["data"]) for event in events] == [{"userid": alice, "n": 1}]
    assert b"garbage" not in body
