"""Request bodies: nothing here takes one, so a body past ``SSE_MAX_BODY_BYTES`` is refused
at once (413 over HTTP/1.1, a stream reset over HTTP/2), never written to disk, and a body
dribbled slowly is cut at the request deadline; everyone else is served meanwhile.

The first tests drive the real site in memory (tests/memory_http.py: a fake transport, a
L{Clock}) through the HTTP/1.1 cases. The others, one per behaviour, run a real server on
the test reactor against the machine's plaintext PostgreSQL and RabbitMQ, over real TLS;
the raw-socket clients run in threads and measure how much of the body they could send
before the answer came.
"""

from __future__ import annotations

import select
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent
from twisted.web.resource import Resource
from twisted.web.server import Request

from sse_twisted._metrics import Metrics
from tests.backends import Pki
from tests.in_process_server import start_server
from tests.logs import failures
from tests.memory_http import MemoryConnection, MemoryServer
from tests.test_limits import _read_all, _tls
from tests.waiting import bounded

_MB = 1024 * 1024


@pytest.fixture
def plaintext_environ(plaintext_environ: dict[str, str]) -> dict[str, str]:
    """The local plaintext backends; logs to stdout only (an in-process server never closes
    its daily log file)."""
    return {name: value for name, value in plaintext_environ.items() if name != "SSE_LOGS_DIR"}


@pytest.fixture
def temporary_files(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every temporary file opened in this process (Twisted spools request bodies with
    C{tempfile.TemporaryFile}, which leaves no name in any directory to look for)."""
    opened: list[Any] = []
    original = tempfile.TemporaryFile

    def spy(*args: Any, **kwargs: Any) -> Any:
        file = original(*args, **kwargs)
        opened.append(file)
        return file

    monkeypatch.setattr(tempfile, "TemporaryFile", spy)
    yield opened


class _Recorder(Resource):
    """Answers every request with 200 and keeps the body each one had."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        return b"ok"


def _connection() -> tuple[MemoryConnection, MemoryServer, _Recorder]:
    """A connection to the real site (limit 1024 bytes, deadline 10 s) in memory, its
    server, and the resource that records the bodies."""
    recorder = _Recorder()
    server = MemoryServer(recorder, request_timeout=10, max_body_bytes=1024)
    return server.connect(), server, recorder


def _in_memory(data: bytes, advance: float = 0.0) -> tuple[bytes, _Recorder, Metrics]:
    """Feed ``data`` to a fresh connection in one read, let ``advance`` seconds pass; what
    it answered, what the resource saw, and what was counted."""
    connection, server, recorder = _connection()
    connection.send(data)
    server.clock.advance(advance)
    answer = connection.received
    connection.close()
    return answer, recorder, server.metrics


def _refused_count(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("sse_requests_refused_total", {"reason": reason})
    return value or 0.0


def test_a_body_within_the_limit_reaches_the_resource_from_memory() -> None:
    body = b"a" * 1024
    answer, recorder, _ = _in_memory(
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 1024\r\n\r\n" + body
    )
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert recorder.bodies == [body]


def test_a_chunked_body_over_the_limit_is_refused_even_when_it_ends_in_the_same_read() -> None:
    chunk = b"b" * 1025
    answer, recorder, metrics = _in_memory(
        b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(chunk)
        + chunk
        + b"\r\n0\r\n\r\n"
        + b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"connection: close" in answer
    # Neither the refused request nor the one pipelined behind it reached the resource.
    assert recorder.bodies == []
    assert answer.count(b"HTTP/1.1 ") == 1
    assert _refused_count(metrics, "body_too_large") == 1


def test_a_declared_body_over_the_limit_gets_413_and_no_100_continue() -> None:
    answer, recorder, _ = _in_memory(
        b"PUT /x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 1025\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"100 Continue" not in answer
    assert recorder.bodies == []


def test_a_chunked_body_gets_413_in_the_read_that_passes_the_limit_and_no_more_is_read() -> None:
    connection, server, recorder = _connection()
    connection.send(b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 300 + b"d" * 300 + b"\r\n"
    for _ in range(3):
        connection.send(chunk)
    assert connection.received == b""
    connection.send(chunk)
    assert connection.received.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert connection.closing
    # Whatever the client still sends is dropped unread.
    connection.send(chunk + b"0\r\n\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    assert connection.received.count(b"HTTP/1.1 ") == 1
    assert recorder.bodies == []
    assert server.refused("body_too_large") == 1


def test_the_request_deadline_runs_on_through_the_body() -> None:
    answer, recorder, metrics = _in_memory(
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"c" * 99, advance=10
    )
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b"request body not received in time\n")
    assert recorder.bodies == []
    assert _refused_count(metrics, "body_too_slow") == 1


def _try_read(connection: ssl.SSLSocket, seconds: float) -> bytes | None:
    """What the server sent within ``seconds``: None if nothing, b"" if it closed. (The
    socket is also readable when only TLS records came, such as session tickets.)"""
    if not connection.pending() and not select.select([connection], [], [], seconds)[0]:
        return None
    connection.setblocking(False)
    try:
        return connection.recv(65536)
    except ssl.SSLWantReadError:
        return None
    finally:
        connection.settimeout(10)


def _upload(port: int, pki: Pki, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int, bool]:
    """Send ``head``, then ``chunks`` until the server answers or closes; return the answer,
    how many body bytes were sent before it, and whether the server then closed the
    connection (rather than leave it open 10 s)."""
    connect = _tls(pki)
    sent = 0
    answer = None
    with connect(port) as connection:
        connection.sendall(head)
        try:
            for chunk in chunks:
                answer = _try_read(connection, 0)
                if answer is not None:
                    break
                connection.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed while we sent: its answer may be waiting
        answer = answer or b""
        try:
            answer += _read_all(connection)
            closed = True
        except TimeoutError:
            closed = False
        except OSError:
            closed = True  # reset: the server closed with our body bytes unread
    return answer, sent, closed


def _zeros(total: int, size: int = 65536) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"\0" * size


def _chunked(total: int, size: int = 65536) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"%x\r\n" % size + b"\0" * size + b"\r\n"
    yield b"0\r\n\r\n"


def _healthz(port: int, pki: Pki) -> bytes:
    with _tls(pki)(port) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return _read_all(connection)


def _refusals(events: Sequence[LogEvent], protocol: str) -> list[LogEvent]:
    return [
        event
        for event in events
        if event.get("log_format") == "refused a request: {reason}"
        and event.get("protocol") == protocol
    ]


@pytest_twisted.ensureDeferred
async def test_a_declared_body_over_the_limit_gets_413_before_the_client_can_send_it(
    plaintext_environ: dict[str, str], pki: Pki, temporary_files: list[Any]
) -> None:
    server = await start_server(plaintext_environ)
    try:
        head = (
            b"POST /healthz HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 314572800\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        answer, sent, closed = await bounded(
            deferToThread(_upload, server.port, pki, head, _zeros(64 * _MB))
        )
        assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), answer[:200]
        assert answer.endswith(b"\r\n\r\nrequest body too large\n")
        # Answered at the end of the head: the client got a few socket buffers out, not
        # the 64 MB it had (the old server read all 300 MB and answered 405).
        assert sent < 16 * _MB
        assert closed
        assert temporary_files == []
        assert _refused_count(server.service.metrics, "body_too_large") == 1
        assert (await deferToThread(_healthz, server.port, pki)).startswith(b"HTTP/1.1 200 ")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_gets_413_once_past_the_limit_and_is_not_read_to_its_end(
    plaintext_environ: dict[str, str],
    pki: Pki,
    temporary_files: list[Any],
    log_events: Sequence[LogEvent],
) -> None:
    server = await start_server(plaintext_environ)
    try:
        head = b"POST /nowhere HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        answer, sent, closed = await bounded(
            deferToThread(_upload, server.port, pki, head, _chunked(64 * _MB))
        )
        assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), answer[:200]
        # The old server read the 64 MB to its end, then answered 404.
        assert sent < 16 * _MB
        assert closed
        assert temporary_files == []
        assert _refused_count(server.service.metrics, "body_too_large") == 1
        assert len(_refusals(log_events, "HTTP/1.1")) == 1
        assert failures(log_events) == []
        assert (await deferToThread(_healthz, server.port, pki)).startswith(b"HTTP/1.1 200 ")
    finally:
        await server.stop()


def _dribble(port: int, pki: Pki, head: bytes) -> tuple[bytes, float]:
    """Send ``head``, then a body byte every 0.2 s; return the answer and after how long
    the server answered."""
    started = time.monotonic()
    answer = None
    with _tls(pki)(port) as connection:
        connection.sendall(head)
        while answer is None and time.monotonic() - started < 15:
            try:
                connection.sendall(b"x")
                answer = _try_read(connection, 0.2)
            except OSError:
                break
        answered = time.monotonic() - started
        try:
            return (answer or b"") + _read_all(connection), answered
        except OSError:
            return answer or b"", answered


@pytest_twisted.ensureDeferred
async def test_a_body_dribbled_slowly_gets_408_at_the_request_deadline(
    plaintext_environ: dict[str, str], pki: Pki
) -> None:
    server = await start_server({**plaintext_environ, "SSE_HEADER_TIMEOUT_SECONDS": "1"})
    try:
        head = b"POST /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
        answer, answered = await bounded(deferToThread(_dribble, server.port, pki, head))
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:200]
        assert answer.endswith(b"request body not received in time\n")
        # The deadline counts from the first byte of the head: the old server waited for
        # as long as a byte came within its 60 s idle timeout (the client gives up after
        # 15 s). The deadline to the tick is tested in memory.
        assert 0.9 < answered < 12
        assert _refused_count(server.service.metrics, "body_too_slow") == 1
    finally:
        await server.stop()


class _H2Client:
    """One HTTP/2 connection over TLS (ALPN h2), driven by hand with the h2 library."""

    def __init__(self, port: int, ca: Path, stream_window: int | None = None) -> None:
        """With ``stream_window``, each stream's flow-control window starts at that many
        bytes (0: the server can send no data at all, as to a client that does not read)."""
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.socket = context.wrap_socket(raw, server_hostname="localhost")
        assert self.socket.selected_alpn_protocol() == "h2"
        self.h2 = h2.connection.H2Connection()
        self.h2.initiate_connection()
        if stream_window is not None:
            self.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
        self.statuses: dict[int, bytes] = {}
        self.resets: dict[int, int] = {}
        self.ended: set[int] = set()
        self.data: dict[int, bytes] = {}
        # The error code of the server's GOAWAY, once received.
        self.goaway: int | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        self.socket.sendall(self.h2.data_to_send())

    def request(self, stream: int, method: str, path: str, *, end: bool, length: int = -1) -> None:
        headers = [(":method", method), (":path", path), (":scheme", "https")]
        headers.append((":authority", "localhost"))
        if length >= 0:
            headers.append(("content-length", str(length)))
        self.h2.send_headers(stream, headers, end_stream=end)
        self.flush()

    def poll(self, seconds: float) -> None:
        """Handle what the server sent within ``seconds``."""
        data = _try_read(self.socket, seconds)
        if data is None:
            return
        if not data:
            self.closed = True
            raise ConnectionError("the server closed the connection")
        events = self.h2.receive_data(data)
        # Once h2 has read a GOAWAY it sends nothing more (a WINDOW_UPDATE would raise).
        terminated = any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                self.statuses[event.stream_id] = dict(event.headers)[b":status"]
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
                if not terminated:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
        self.flush()

    def wait(self, done: Any, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            self.poll(0.1)

    def send_body(self, stream: int, total: int, chunk: int = 16384) -> int:
        """Send up to ``total`` bytes on ``stream`` as fast as flow control allows, until
        the stream is reset; return how many were sent."""
        sent = 0
        deadline = time.monotonic() + 20
        while sent < total and stream not in self.resets and time.monotonic() < deadline:
            window = min(self.h2.local_flow_control_window(stream), chunk, total - sent)
            if window <= 0:
                self.poll(1)
                continue
            self.h2.send_data(stream, b"\0" * window, end_stream=sent + window == total)
            self.flush()
            sent += window
            self.poll(0)
        return sent

    def close(self) -> None:
        self.socket.close()


def _h2_body_over_the_limit(port: int, ca: Path) -> dict[str, Any]:
    """On one connection: a GET /healthz streaming 8 MB, a POST declaring 300 MB, then a
    plain GET /healthz; what became of each."""
    client = _H2Client(port, ca)
    try:
        client.request(1, "GET", "/healthz", end=False)
        sent = client.send_body(1, 8 * _MB)
        client.request(3, "POST", "/nowhere", end=False, length=300 * _MB)
        client.wait(lambda: 3 in client.resets)
        client.request(5, "GET", "/healthz", end=True)
        client.wait(lambda: 5 in client.ended or 5 in client.resets)
        return {"sent": sent, "statuses": client.statuses, "resets": client.resets}
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_http2_body_over_the_limit_resets_its_stream_and_the_connection_serves_on(
    plaintext_environ: dict[str, str],
    pki: Pki,
    temporary_files: list[Any],
    log_events: Sequence[LogEvent],
) -> None:
    server = await start_server(plaintext_environ)
    try:
        outcome = await bounded(
            deferToThread(_h2_body_over_the_limit, server.port, pki.ca_certificate), 60
        )
        # Reset once past the limit: the client sent about one flow-control window, not
        # the 8 MB the old server read (and answered 200).
        assert 1 in outcome["resets"], outcome
        assert outcome["sent"] <= 2 * 65535
        assert 1 not in outcome["statuses"]
        # A declared length over the limit is reset before any data is sent.
        assert 3 in outcome["resets"]
        assert 3 not in outcome["statuses"]
        # The same connection serves its next stream, and other clients are served.
        assert outcome["statuses"].get(5) == b"200"
        assert (await deferToThread(_healthz, server.port, pki)).startswith(b"HTTP/1.1 200 ")
        assert temporary_files == []
        assert _refused_count(server.service.metrics, "body_too_large") == 2
        # Counted each time, logged once per connection.
        assert len(_refusals(log_events, "HTTP/2")) == 1
        assert failures(log_events) == []
    finally:
        await server.stop()


def _h2_dribble(port: int, ca: Path) -> dict[str, Any]:
    """On one connection: a POST dribbling a byte every 0.2 s until it is reset, then a
    plain GET /healthz; after how long the first was reset, and what became of each."""
    client = _H2Client(port, ca)
    try:
        started = time.monotonic()
        client.request(1, "POST", "/healthz", end=False)
        while 1 not in client.resets and time.monotonic() - started < 15:
            client.h2.send_data(1, b"x")
            client.flush()
            client.poll(0.2)
        reset_after = time.monotonic() - started
        client.request(3, "GET", "/healthz", end=True)
        client.wait(lambda: 3 in client.ended or 3 in client.resets)
        return {"reset_after": reset_after, "statuses": client.statuses, "resets": client.resets}
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_an_http2_body_dribbled_slowly_is_reset_at_the_request_deadline(
    plaintext_environ: dict[str, str], pki: Pki
) -> None:
    server = await start_server({**plaintext_environ, "SSE_HEADER_TIMEOUT_SECONDS": "1"})
    try:
        outcome = await bounded(deferToThread(_h2_dribble, server.port, pki.ca_certificate), 30)
        assert 1 in outcome["resets"], outcome
        # The old server reset nothing: each frame restarted its 60 s idle timeout (the
        # client gives up after 15 s).
        assert 0.9 < outcome["reset_after"] < 12
        assert outcome["statuses"].get(3) == b"200"
        assert _refused_count(server.service.metrics, "body_too_slow") == 1
    finally:
        await server.stop()
