"""The load generator's browsers: many SSE streams over TLS on one asyncio (uvloop) loop.

Parsing is the least that counting and timing events need, so that the generator stays far
cheaper than the server it measures: HTTP/1.1 is read by hand (status line, then chunked
body), HTTP/2 goes through the ``h2`` state machine with flow-control windows opened wide
once, so that no WINDOW_UPDATE is ever owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings

__all__ = [
    "EventSink",
    "Fleet",
    "SequentialConnects",
    "Subscription",
    "client_tls_context",
    "connect_one_by_one",
]

_MAX_WINDOW = 2**31 - 1
_SEQ_FIELD = b'"seq":'
_SENT_FIELD = b'"sent":'


def client_tls_context(ca_file: Path, alpn: str, verify: bool = True) -> ssl.SSLContext:
    """TLS 1.3 only, trusting the development CA, offering one ALPN protocol.

    Without ``verify`` the generator skips checking the server's certificate, which halves
    its own handshake cost and changes nothing on the server's side.
    """
    context = ssl.create_default_context(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols([alpn])
    return context


@dataclass(frozen=True, slots=True)
class Subscription:
    """What one stream subscribes as: ``user`` is the index of the user in the bench's list."""

    user: int
    path: bytes


def _field_int(event: bytes, name: bytes) -> int:
    # The server re-serialises compact JSON and keeps key order: an integer field is the
    # digits after `"name":`, up to the next delimiter.
    start = event.find(name)
    if start < 0:
        return -1
    start += len(name)
    end = start
    while event[end] in b"0123456789":
        end += 1
    return int(event[start:end])


class EventSink:
    """Counts what arrives; scenarios read its fields.

    ``record_seq`` keeps the ``seq`` of every event per user (loss, duplicates, routing);
    ``record_latency`` keeps publish-to-receive latencies from the ``sent`` field.
    """

    def __init__(self, record_seq: bool = False, record_latency: bool = False) -> None:
        self.events = 0
        self.comments = 0
        self.first_event_at = 0.0
        self.last_event_at = 0.0
        self.record_seq = record_seq
        self.record_latency = record_latency
        self.seqs: list[tuple[int, int]] = []
        self.latencies_ns: list[int] = []

    def comment(self) -> None:
        """A ``: comment`` frame (connected, keep-alive)."""
        self.comments += 1

    def event(self, user: int, frame: bytes) -> None:
        """One ``id:/data:`` event for the stream of ``user``."""
        now_ns = time.monotonic_ns()
        if self.record_latency:
            sent = _field_int(frame, _SENT_FIELD)
            if sent >= 0:
                self.latencies_ns.append(now_ns - sent)
        if self.record_seq:
            self.seqs.append((user, _field_int(frame, _SEQ_FIELD)))
        if not self.events:
            self.first_event_at = now_ns / 1e9
        self.last_event_at = now_ns / 1e9
        self.events += 1


_CONNECTED = b": connected"
_UNAVAILABLE = b": backend unavailable, retry"


class _SSEBody:
    """Splits an event-stream body into frames: comments to the sink, events with the user.

    The stream counts as open at the server's ``: connected`` comment: a ``200`` whose body
    says the backend is unavailable (and ends) is a failure.
    """

    __slots__ = ("_buffer", "_sink", "_stream", "_user")

    def __init__(self, sink: EventSink, user: int, stream: _Stream) -> None:
        self._buffer = b""
        self._sink = sink
        self._user = user
        self._stream = stream

    def feed(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            frame = buffer[start:end]
            start = end + 2
            if frame.startswith(b":"):
                self._sink.comment()
                if frame == _CONNECTED:
                    self._stream._establish()
                elif frame == _UNAVAILABLE:
                    self._stream._fail("backend unavailable")
            elif b"data:" in frame:
                self._sink.event(self._user, frame)
            # retry: frames need no counting.
        self._buffer = buffer[start:]


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class _Stream:
    """State shared by both protocols: established, failed, closed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.established: asyncio.Future[None] = loop.create_future()
        # A failure nobody waits for any more (the opener gave up first) is no error.
        self.established.add_done_callback(_retrieve)
        self.closed: asyncio.Future[None] = loop.create_future()
        # The response ended (its last chunk, END_STREAM, a reset) or its connection did.
        self.ended: asyncio.Future[None] = loop.create_future()
        self.status = 0

    def _establish(self) -> None:
        if not self.established.done():
            self.established.set_result(None)

    def _end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.established.done():
            self.established.set_exception(ConnectionError(reason))
        if not self.closed.done():
            self.closed.set_result(None)
        self._end()


class HTTP1Stream(asyncio.Protocol, _Stream):
    """One SSE stream over its own HTTP/1.1 connection."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, subscription: Subscription, sink: EventSink
    ) -> None:
        _Stream.__init__(self, loop)
        self.transport: asyncio.Transport | None = None
        self._request = (
            b"GET " + subscription.path + b" HTTP/1.1\r\nHost: localhost\r\n"
            b"Accept: text/event-stream\r\n\r\n"
        )
        self._head = b""
        self._chunks = b""
        self._body = _SSEBody(sink, subscription.user, self)
        self._in_body = False
        self.stalled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if not self._in_body:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self._head[9:12])
            if self.status != 200 or b"chunked" not in self._head[:end].lower():
                self._fail(f"status {self.status}")
                assert self.transport is not None
                self.transport.close()
                return
            data, self._head, self._in_body = self._head[end + 4 :], b"", True
        self._dechunk(data)

    def _establish(self) -> None:
        super()._establish()
        if self.stalled and self.transport is not None:
            self.transport.pause_reading()

    def _dechunk(self, data: bytes) -> None:
        buffer = self._chunks + data if self._chunks else data
        position = 0
        while True:
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                break
            size = int(buffer[position:line_end], 16)
            chunk_end = line_end + 2 + size
            if len(buffer) < chunk_end + 2:
                break
            if size == 0:
                position = len(buffer)
                self._end()
                break
            self._body.feed(buffer[line_end + 2 : chunk_end])
            position = chunk_end + 2
        self._chunks = buffer[position:]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class HTTP2Connection(asyncio.Protocol):
    """Many SSE streams multiplexed over one HTTP/2 connection."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        subscriptions: Sequence[Subscription],
        sink: EventSink,
    ) -> None:
        self._loop = loop
        self._subscriptions = subscriptions
        self._sink = sink
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self._bodies: dict[int, _SSEBody] = {}
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self._connection = h2.connection.H2Connection(config=config)
        self.lost: asyncio.Future[None] = loop.create_future()

    def open_streams(self) -> list[_Stream]:
        """The streams this connection will carry, created before the connection is made."""
        return [self._stream_for(index) for index in range(len(self._subscriptions))]

    def _stream_for(self, index: int) -> _Stream:
        stream_id = 1 + 2 * index
        stream = self.streams.get(stream_id)
        if stream is None:
            stream = self.streams[stream_id] = _Stream(self._loop)
        return stream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        connection = self._connection
        connection.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _MAX_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        connection.initiate_connection()
        connection.increment_flow_control_window(_MAX_WINDOW - 65535)
        for index, subscription in enumerate(self._subscriptions):
            stream_id = connection.get_next_available_stream_id()
            assert stream_id == 1 + 2 * index
            self._bodies[stream_id] = _SSEBody(
                self._sink, subscription.user, self.streams[stream_id]
            )
            connection.send_headers(
                stream_id,
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", b"localhost"),
                    (b":path", subscription.path),
                    (b"accept", b"text/event-stream"),
                ],
                end_stream=True,
            )
        transport.write(connection.data_to_send())

    def data_received(self, data: bytes) -> None:
        connection = self._connection
        for event in connection.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                self._bodies[event.stream_id].feed(event.data)
            elif isinstance(event, h2.events.ResponseReceived):
                stream = self.streams[event.stream_id]
                for name, value in event.headers:
                    if name == b":status":
                        stream.status = int(value)
                if stream.status != 200:
                    stream._fail(f"status {stream.status}")
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                self.streams[event.stream_id]._fail("stream ended")
        outgoing = connection.data_to_send()
        if outgoing and self.transport is not None:
            self.transport.write(outgoing)

    def connection_lost(self, exc: Exception | None) -> None:
        for stream in self.streams.values():
            stream._fail(f"connection lost: {exc}")
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class OpenResult:
    """How opening a batch of streams went."""

    requested: int
    established: int
    failures: int
    seconds: float
    failure_reasons: dict[str, int] = field(default_factory=dict)


class Fleet:
    """Every stream the generator holds open against one server."""

    def __init__(self, port: int, ca_file: Path, sink: EventSink) -> None:
        self.port = port
        self.sink = sink
        verify = os.environ.get("BENCH_VERIFY", "0") == "1"
        self._http1_tls = client_tls_context(ca_file, "http/1.1", verify)
        self._http2_tls = client_tls_context(ca_file, "h2", verify)
        self._closers: list[Callable[[], None]] = []
        self.established = 0
        # Every stream opened, and a future of each connection's end (bench.drain times them).
        self.streams: list[_Stream] = []
        self.connections_lost: list[asyncio.Future[None]] = []

    async def _connect(
        self,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        receive_buffer: int | None = None,
    ) -> asyncio.Protocol:
        loop = asyncio.get_running_loop()
        sock = None
        if receive_buffer is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", self.port))
            _, protocol = await loop.create_connection(
                factory, sock=sock, ssl=context, server_hostname="localhost"
            )
            return protocol
        _, protocol = await loop.create_connection(
            factory, "127.0.0.1", self.port, ssl=context, server_hostname="localhost"
        )
        return protocol

    async def open_http1(
        self,
        subscriptions: Sequence[Subscription],
        concurrency: int,
        timeout: float = 60.0,
        stalled: bool = False,
    ) -> OpenResult:
        """Open one HTTP/1.1 connection per subscription, ``concurrency`` handshakes at a time.

        A ``stalled`` stream stops reading once its response has begun, with a tiny receive
        buffer, like a browser tab on a frozen machine.
        """
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        reasons: dict[str, int] = {}
        started = time.monotonic()

        async def one(subscription: Subscription) -> bool:
            async with gate:
                stream = HTTP1Stream(loop, subscription, self.sink)
                stream.stalled = stalled
                try:
                    await asyncio.wait_for(
                        self._connect(lambda: stream, self._http1_tls, 4096 if stalled else None),
                        timeout,
                    )
                    self._closers.append(stream.close)
                    self.streams.append(stream)
                    self.connections_lost.append(stream.closed)
                    await asyncio.wait_for(asyncio.shield(stream.established), timeout)
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as error:
                    reason = f"{type(error).__name__}: {error}"[:80]
                    reasons[reason] = reasons.get(reason, 0) + 1
                    stream.close()
                    return False
                return True

        results = await asyncio.gather(*(one(each) for each in subscriptions))
        established = sum(results)
        self.established += established
        return OpenResult(
            requested=len(subscriptions),
            established=established,
            failures=len(subscriptions) - established,
            seconds=time.monotonic() - started,
            failure_reasons=reasons,
        )

    async def open_http2(
        self,
        subscriptions: Sequence[Subscription],
        streams_per_connection: int,
        concurrency: int,
        timeout: float = 60.0,
    ) -> OpenResult:
        """Open the subscriptions as streams of HTTP/2 connections, each carrying up to
        ``streams_per_connection`` of them."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        reasons: dict[str, int] = {}
        started = time.monotonic()
        groups = [
            subscriptions[start : start + streams_per_connection]
            for start in range(0, len(subscriptions), streams_per_connection)
        ]

        async def one(group: Sequence[Subscription]) -> int:
            async with gate:
                connection = HTTP2Connection(loop, group, self.sink)
                streams = connection.open_streams()
                try:
                    await asyncio.wait_for(
                        self._connect(lambda: connection, self._http2_tls), timeout
                    )
                    self._closers.append(connection.close)
                    self.streams.extend(streams)
                    self.connections_lost.append(connection.lost)
                except (OSError, ConnectionError, TimeoutError, ssl.SSLError) as error:
                    reason = type(error).__name__
                    reasons[reason] = reasons.get(reason, 0) + len(group)
                    return 0
                done = 0
                for stream in streams:
                    try:
                        await asyncio.wait_for(asyncio.shield(stream.established), timeout)
                        done += 1
                    except (ConnectionError, TimeoutError) as error:
                        reason = type(error).__name__
                        reasons[reason] = reasons.get(reason, 0) + 1
                return done

        results = await asyncio.gather(*(one(group) for group in groups))
        established = sum(results)
        self.established += established
        return OpenResult(
            requested=len(subscriptions),
            established=established,
            failures=len(subscriptions) - established,
            seconds=time.monotonic() - started,
            failure_reasons=reasons,
        )

    def close_all(self) -> None:
        """Abort every connection (no TLS close_notify: the server sees a reset)."""
        for close in self._closers:
            close()
        self._closers.clear()
        self.established = 0


@dataclass
class SequentialConnects:
    """Streams opened one after the other on blocking sockets, and what their TLS did."""

    sockets: list[ssl.SSLSocket] = field(default_factory=list)
    sessions: list[ssl.SSLSession | None] = field(default_factory=list)
    session_reused: int = 0
    sessions_with_ticket: int = 0
    failures: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        """Close every socket (the server sees the streams end)."""
        for each in self.sockets:
            with contextlib.suppress(OSError):
                each.close()
        self.sockets.clear()


def connect_one_by_one(
    port: int,
    context: ssl.SSLContext,
    paths: Sequence[bytes],
    sessions: Sequence[ssl.SSLSession | None] = (),
    timeout: float = 10.0,
) -> SequentialConnects:
    """Open a stream on each of ``paths`` in turn, each once the previous one is open.

    Blocking (run it in a thread): asyncio's ``create_connection`` cannot offer a TLS session
    to resume, ``SSLContext.wrap_socket(session=...)`` can. Connection ``i`` offers
    ``sessions[i]`` when there is one, as a browser reconnecting to the same server does;
    each socket stays open, and its session (read once the stream is open, after the server's
    TLS 1.3 tickets) is kept for a later round.
    """
    result = SequentialConnects()
    for index, path in enumerate(paths):
        session = sessions[index] if index < len(sessions) else None
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
            tls.sendall(
                b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n"
                b"Accept: text/event-stream\r\n\r\n"
            )
            received = b""
            while _CONNECTED not in received:
                data = tls.recv(65536)
                if not data:
                    raise ConnectionError(f"closed after {received[:12]!r}")
                received += data
            if not received.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"status {received[9:12].decode()}")
        except (OSError, ConnectionError) as error:
            reason = f"{type(error).__name__}: {error}"[:80]
            result.failure_reasons[reason] = result.failure_reasons.get(reason, 0) + 1
            result.failures += 1
            result.sessions.append(None)
            continue
        result.sockets.append(tls)
        result.session_reused += bool(tls.session_reused)
        result.sessions.append(tls.session)
        result.sessions_with_ticket += bool(tls.session and tls.session.has_ticket)
    return result
