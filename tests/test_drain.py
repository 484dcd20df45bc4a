"""The drain on SIGTERM, with real clients against a real ``twistd``: httpx-sse over HTTP/1.1
and HTTP/2 (following a stream, then coming back on the same client as an EventSource does),
a raw HTTP/1.1 socket and an HTTP/2 connection driven with the h2 library (to see what the
server sends on the wire: the last chunk then the close, or the end of stream then GOAWAY).

Each client runs on a thread of its own; the test reactor reads the server's log lines.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_twisted
from httpx_sse import connect_sse
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.backends import Pki
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.test_bodies import _H2Client
from tests.twistd_processes import spawn_twistd
from tests.waiting import bounded, wait_for

PROTOCOLS = ["HTTP/1.1", "HTTP/2"]
RETRY_MILLISECONDS = 100


def drain_environ(environ: dict[str, str], drain_seconds: float) -> dict[str, str]:
    """Quick reconnects: the stream starts with ``retry: 100``, the drain sends 100 to
    150 ms."""
    return {
        **environ,
        "SSE_DRAIN_SECONDS": str(drain_seconds),
        "SSE_RETRY_MILLISECONDS": str(RETRY_MILLISECONDS),
        "SSE_RECONNECT_JITTER_MILLISECONDS": "50",
    }


def signal_from_thread(fired: Deferred[None]) -> Callable[[], None]:
    """A function a client thread calls to fire ``fired`` on the reactor."""
    return lambda: reactor.callFromThread(fired.callback, None)


def follow_then_reconnect(url: str, ca: Path, http2: bool, opened: Callable[[], None]) -> Any:
    """As an EventSource does, with httpx-sse: follow the stream to its end, wait the last
    ``retry:`` delay, then come back on the same client (its connection pool)."""
    outcome: dict[str, Any] = {}
    tls = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(http2=http2, verify=tls, timeout=30) as client:
        with connect_sse(client, "GET", url) as source:
            outcome["version"] = source.response.http_version
            opened()
            retries = [event.retry for event in source.iter_sse() if event.retry is not None]
        outcome["retries"] = retries
        time.sleep(retries[-1] / 1000)
        outcome["reconnect_at"] = time.monotonic()
        try:
            with client.stream("GET", url, headers={"accept": "text/event-stream"}) as answer:
                outcome["reconnect"] = answer.status_code
        except httpx.TransportError as error:
            outcome["reconnect"] = type(error).__name__
    return outcome


def http1_until_closed(port: int, ca: Path, path: str, opened: Callable[[], None]) -> bytes:
    """Every byte of one HTTP/1.1 stream until the server closes the connection."""
    tls = ssl.create_default_context(cafile=str(ca))
    tls.set_alpn_protocols(["http/1.1"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        tls.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        received = b""
        while b": connected" not in received:
            received += connection.recv(65536)
        opened()
        while chunk := connection.recv(65536):
            received += chunk
    return received


def http2_until_closed(
    port: int, ca: Path, path: str, opened: Callable[[], None], stream_window: int | None = None
) -> _H2Client:
    """One HTTP/2 stream, followed until the server closes the connection (or resets it)."""
    client = _H2Client(port, ca, stream_window)
    try:
        client.request(1, "GET", path, end=True)
        client.wait(lambda: 1 in client.statuses)
        opened()
        try:
            client.wait(lambda: False, 30)
        except ConnectionError:
            client.closed = True
    finally:
        client.close()
    return client


def aborting_lines(lines: list[dict[str, Any]]) -> list[str]:
    return [line["message"] for line in lines if line["message"].startswith("aborting")]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_on_sigterm_each_stream_gets_its_retry_and_end_and_its_connection_closes_at_once(
    protocol: str,
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    pki: Pki,
) -> None:
    environ = drain_environ(plaintext_environ, drain_seconds=30)
    database = environ["SSE_POSTGRES_DB_NAME"]
    (userid, token), (raw_userid, raw_token) = (add_local_subscriber(database) for _ in "ab")
    process, transport = spawn_twistd(environ, tmp_path)
    try:
        port = await bounded(process.port, 30)
        path = f"/subscribe/{new_uuid()}/{userid}/{token}"
        raw_path = f"/subscribe/{new_uuid()}/{raw_userid}/{raw_token}"
        opened: Deferred[None] = Deferred()
        raw_opened: Deferred[None] = Deferred()
        following = deferToThread(
            follow_then_reconnect,
            f"https://localhost:{port}{path}",
            pki.ca_certificate,
            protocol == "HTTP/2",
            signal_from_thread(opened),
        )
        raw = deferToThread(
            http2_until_closed if protocol == "HTTP/2" else http1_until_closed,
            port,
            pki.ca_certificate,
            raw_path,
            signal_from_thread(raw_opened),
        )
        await bounded(opened)
        await bounded(raw_opened)
    finally:
        transport.signalProcess("TERM")
    # Well before SSE_DRAIN_SECONDS (30): the connections closed once their streams ended.
    await bounded(process.ended, 20)
    outcome = await bounded(following)
    raw_client = await bounded(raw)
    assert aborting_lines(process.lines) == []

    assert outcome["version"] == protocol
    # The stream's first retry, then the drain's (jittered), then its end.
    assert len(outcome["retries"]) == 2
    assert RETRY_MILLISECONDS <= outcome["retries"][1] <= RETRY_MILLISECONDS + 50
    # The connection could not be used again (closed, or GOAWAY): the reconnect went to a
    # new connection, which nothing accepted.
    assert outcome["reconnect"] == "ConnectError"

    if protocol == "HTTP/2":
        assert raw_client.ended == {1}
        assert b"retry: " in raw_client.data[1].split(b": connected")[1]
        assert raw_client.goaway == 0  # NO_ERROR
        assert raw_client.closed
    else:
        # A chunk with the retry, the last chunk, then the server closed the connection.
        assert raw_client.endswith(b"\r\n0\r\n\r\n")
        assert b"retry: " in raw_client.split(b": connected")[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest_twisted.ensureDeferred
async def test_a_client_reconnecting_during_the_drain_gets_no_stream_and_a_non_reader_is_cut(
    protocol: str,
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    pki: Pki,
) -> None:
    environ = drain_environ(plaintext_environ, drain_seconds=4)
    database = environ["SSE_POSTGRES_DB_NAME"]
    (userid, token), (stuck_userid, stuck_token) = (add_local_subscriber(database) for _ in "ab")
    process, transport = spawn_twistd(environ, tmp_path)
    try:
        port = await bounded(process.port, 30)
        # An HTTP/2 client that gives no flow-control window: the server can send it
        # nothing, not even the drain's retry, so the drain lasts SSE_DRAIN_SECONDS.
        stuck_opened: Deferred[None] = Deferred()
        stuck = deferToThread(
            http2_until_closed,
            port,
            pki.ca_certificate,
            f"/subscribe/{new_uuid()}/{stuck_userid}/{stuck_token}",
            signal_from_thread(stuck_opened),
            0,
        )
        await bounded(stuck_opened)
        opened: Deferred[None] = Deferred()
        following = deferToThread(
            follow_then_reconnect,
            f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}",
            pki.ca_certificate,
            protocol == "HTTP/2",
            signal_from_thread(opened),
        )
        await bounded(opened)
    finally:
        transport.signalProcess("TERM")
    await bounded(process.ended, 20)
    exited_at = time.monotonic()
    outcome = await bounded(following)
    stuck_client = await bounded(stuck)

    assert outcome["version"] == protocol
    assert len(outcome["retries"]) == 2
    # While the server was still draining, the client came back: not on its old
    # connection (HTTP/1.1: closed; HTTP/2: GOAWAY), and no new connection was accepted.
    assert outcome["reconnect_at"] < exited_at
    assert outcome["reconnect"] == "ConnectError"
    # The client that took nothing was cut at SSE_DRAIN_SECONDS.
    assert aborting_lines(process.lines) == ["aborting 1 connections still open"]
    assert stuck_client.closed
    assert stuck_client.ended == set()


def open_held_stream(port: int, ca: Path, path: str) -> _H2Client:
    """An HTTP/2 connection with one stream open to which the server can send nothing (no
    flow-control window): it keeps the connection from being closed by the drain."""
    client = _H2Client(port, ca, stream_window=0)
    client.request(1, "GET", path, end=True)
    client.wait(lambda: 1 in client.statuses)
    return client


def open_another_stream(client: _H2Client, path: str) -> _H2Client:
    """A new stream on ``client``'s connection, with a window to receive its answer."""
    client.request(3, "GET", path, end=True)
    client.h2.increment_flow_control_window(65535, stream_id=3)
    client.flush()
    try:
        client.wait(lambda: 3 in client.ended)
    except ConnectionError:
        client.closed = True
    client.close()
    return client


@pytest_twisted.ensureDeferred
async def test_a_stream_opened_on_a_connection_still_open_during_the_drain_gets_only_a_retry(
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    pki: Pki,
) -> None:
    environ = drain_environ(plaintext_environ, drain_seconds=4)
    userid, token = add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"])
    process, transport = spawn_twistd(environ, tmp_path)
    try:
        port = await bounded(process.port, 30)
        client = await deferToThread(
            open_held_stream,
            port,
            pki.ca_certificate,
            f"/subscribe/{new_uuid()}/{userid}/{token}",
        )
    finally:
        transport.signalProcess("TERM")
    await wait_for(
        lambda: any(line["message"] == "draining 1 streams" for line in process.lines),
        "the drain never started",
    )
    await bounded(
        deferToThread(open_another_stream, client, f"/subscribe/{new_uuid()}/{userid}/{token}")
    )
    await bounded(process.ended, 20)
    # Answered as when the database is down: a 200 that ends at once, with a retry: the
    # browser comes back later (to another server); no stream was opened.
    assert client.statuses[3] == b"200"
    assert b": connected" not in client.data[3]
    assert b": server stopping, retry" in client.data[3]
    assert b"retry: " in client.data[3]
    assert 3 in client.ended
