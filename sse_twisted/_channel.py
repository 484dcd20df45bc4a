"""The HTTP/1.1 channel with the request limits a server on the open internet needs.

Twisted's own C{HTTPChannel} already bounds a request head (C{totalHeadersSize},
C{maxHeaders}), but answers a breach with a bare C{400} and has no deadline for the request
itself: its idle timeout restarts with every byte, so a client dribbling a request a byte
at a time (slowloris) holds a connection for ever. It also reads any request body to its
end, however large, before the resource sees the request. This channel answers C{431} with
a reason; gives each request (head and body) a deadline that data does not extend, C{408};
and refuses a body over ``max_body_bytes`` with C{413}: a C{Content-Length} over it at the
end of the head, before a byte of the body is read, a chunked body as soon as its bytes
pass it (L{sse_twisted._bodies} counts them). Where Twisted finds a request malformed it
answers C{400} with a reason and logs it, and it stops reading bytes pipelined behind a
request in progress in the one state where Twisted keeps reading them: while the response
waits for a slow client. Each refusal closes the connection: it is logged once.

HTTP/2 request heads are bounded by the h2 library (HPACK's header list limit, 64 KiB);
HTTP/2 request bodies and deadlines are handled per stream in L{sse_twisted._bodies}.

On stop each connection is drained (L{DrainingChannelProtocol.drain}): closed once its
responses in progress have ended, an HTTP/2 one with GOAWAY.

An HTTP/2 connection sends the DATA frames waiting on all its streams together, in one
write (L{BatchingH2Connection}), not one frame per reactor turn.
"""

from __future__ import annotations

from typing import Any

import priority
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._http2 import _END_STREAM_SENTINEL, H2Connection
from twisted.web.http import HTTPChannel, Request, _GenericHTTPChannelProtocol

from ._metrics import Metrics

# Twisted's private names this module uses, and nowhere else in sse_twisted: each has no
# public equivalent. Checked with Twisted 24.7.0 and 26.10.0 (pyproject.toml pins the range);
# tests/test_private_names.py fails naming the one that changed.
#  - HTTPChannel._respondToBadRequestAndDisconnect, overridden: where Twisted answers a
#    malformed request (request line, header line, length, chunk size) with a bare 400.
#  - _GenericHTTPChannelProtocol: the connection's protocol, which switches to HTTP/2 when
#    ALPN chose it (Site.protocol builds one; Site has no public way to change its
#    HTTPChannel); _channel: the HTTPChannel or twisted.web._http2.H2Connection behind it.
#  - H2Connection._streamCleanupCallbacks: a Deferred per stream, fired once the stream is
#    done (its END_STREAM written, or reset); H2Connection.conn is its h2 connection.
#  - What _GenericHTTPChannelProtocol.dataReceived does to switch to HTTP/2, repeated in
#    DrainingChannelProtocol._switch_to_h2 to build a BatchingH2Connection instead: the
#    HTTPChannel's _networkProducer, its _requestFactory, _site, _factory, _timeOut and
#    _callLater, and _negotiatedProtocol.
#  - H2Connection's sending loop, which BatchingH2Connection._sendPrioritisedData replaces:
#    priority (a priority.PriorityTree of streams with data), _outboundStreamQueues (a
#    deque of bytes per stream, _END_STREAM_SENTINEL for its end), _stillProducing,
#    _consumerBlocked (a Deferred while the transport is paused), _sendingDeferred (fired
#    when a stream gets data), _reactor, _requestDone, remainingOutboundWindow and
#    streams[id].flowControlBlocked.

__all__ = [
    "BatchingH2Connection",
    "DrainingChannelProtocol",
    "LimitedHTTPChannel",
    "limited_channel_protocol",
]

# How long a refused client gets to read the refusal before its connection is cut.
_GRACE_SECONDS = 5.0
# Bytes pipelined behind a response in progress read before reads pause: Twisted's own
# allowance (HTTPChannel's optimistic eager read, 16 KiB since Twisted 17.9).
_PIPELINED_READ_BYTES = 16384
# What an HTTP/2 connection sends in one reactor turn at most, so that one connection with
# much to send does not hold the reactor (and its own transport pauses it in between).
_H2_TURN_BYTES = 65536


def _refusal(status: bytes, reason: str) -> bytes:
    body = reason.encode("utf-8") + b"\n"
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )


class LimitedHTTPChannel(HTTPChannel):
    """An L{HTTPChannel} that refuses a request head over ``max_header_bytes`` (or over
    ``maxHeaders`` lines) with C{431}, a body over ``max_body_bytes`` with C{413}, and a
    request (head and body) not complete after ``request_timeout`` seconds with C{408};
    each time the connection is closed."""

    log = Logger()

    def __init__(
        self,
        max_header_bytes: int,
        request_timeout: float,
        max_body_bytes: int,
        metrics: Metrics,
    ) -> None:
        super().__init__()
        self.max_header_bytes = max_header_bytes
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        # Twisted's own checks stay as a backstop, just beyond ours, so ours answer first;
        # a single line longer than the limit ends in lineLengthExceeded.
        self.totalHeadersSize = max_header_bytes + 1
        self.MAX_LENGTH = max_header_bytes
        self.maxHeaders = 100
        self._head_bytes = 0
        self._head_lines = 0
        self._in_body = False
        self._request_deadline: IDelayedCall | None = None
        self._abort_call: IDelayedCall | None = None
        self._refused = False
        self._draining = False
        # From a request's end until its response's: Twisted holds what the client sends
        # meanwhile (see rawDataReceived).
        self._responding = False
        self._pipelined_bytes = 0
        self._transport_full = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm_request_deadline()

    def drain(self) -> None:
        """Close the connection once the response in progress has ended (now, if none):
        its client makes a new connection for its next request, to another server."""
        self._draining = True
        self.persistent = False
        if not self.requests:
            self.loseConnection()

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        """A request read while draining is answered with C{Connection: close}, and the
        connection closed after it."""
        if self._draining:
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def setTimeout(self, period: float | None) -> float | None:
        """Also drop the request deadline when the idle timeout is cancelled: Twisted does
        that to this channel when ALPN hands the connection to HTTP/2."""
        if period is None:
            self._disarm_request_deadline()
        return super().setTimeout(period)

    def _arm_request_deadline(self) -> None:
        if self._request_deadline is None:
            self._request_deadline = self.callLater(self.request_timeout, self._too_slow)

    def _disarm_request_deadline(self) -> None:
        if self._request_deadline is not None:
            if self._request_deadline.active():
                self._request_deadline.cancel()
            self._request_deadline = None

    def lineReceived(self, line: bytes) -> None:
        """Count the head's bytes and lines before Twisted parses the line."""
        if self._refused:
            return
        if self._head_lines == 0:
            if not line:
                # The empty line some clients send between requests starts no head.
                super().lineReceived(line)
                return
            self._arm_request_deadline()
        self._head_bytes += len(line) + 2
        self._head_lines += 1
        if self._head_bytes > self.max_header_bytes:
            self._refuse_head_too_large("request headers too large")
            return
        if self._head_lines > self.maxHeaders + 1:
            self._refuse_head_too_large("too many request headers")
            return
        if not line:
            # The head is complete; the deadline runs on until the body is.
            self._head_bytes = self._head_lines = 0
            self._in_body = True
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        """Refuse a declared body over the limit before reading a byte of it (and before
        Twisted answers an C{Expect: 100-continue})."""
        if self.length is not None and self.length > self.max_body_bytes:
            self.refuse_body_too_large()
            return
        super().allHeadersReceived()

    def refuse_body_too_large(self) -> None:
        """Answer C{413} and close: the request's body is over the limit."""
        self._refuse(b"413 Content Too Large", "request body too large", "body_too_large")

    def allContentReceived(self) -> None:
        """The request is complete, unless it was refused (a chunked body can end in the
        same read that passed the limit): the deadline stops here."""
        if self._refused:
            return
        self._in_body = False
        self._disarm_request_deadline()
        # Before Twisted hands the request over: its response may be over at once, and the
        # next request (read from what was pipelined) start, within this call.
        self._responding = True
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        """Drop the bytes after a refusal. Stop reading bytes pipelined behind a request in
        progress once Twisted's allowance is buffered, also while the response waits for
        the transport to drain: Twisted skips its pause then, and a client that stops
        reading its stream could make the server buffer every byte it sends after it."""
        if self._refused:
            return
        if self._responding:
            # Twisted buffers these whole until the response is done.
            self._pipelined_bytes += len(data)
        super().rawDataReceived(data)
        if (
            self._responding
            and self._transport_full
            and self._pipelined_bytes > _PIPELINED_READ_BYTES
        ):
            # Resumed as Twisted resumes its own pause: when the request is done, or when
            # the transport drains after that.
            reads = IPushProducer(self.transport, None)
            if reads is not None:
                reads.pauseProducing()

    def requestDone(self, request: Request) -> None:
        """The response in progress is over: Twisted reads what was pipelined behind it,
        or closes the connection (and keeps dropping what comes) if it is not persistent."""
        if self.persistent:
            self._responding = False
            self._pipelined_bytes = 0
        super().requestDone(request)

    def pauseProducing(self) -> None:
        """The transport's buffer is full: a response waits for the client to read."""
        self._transport_full = True
        super().pauseProducing()

    def resumeProducing(self) -> None:
        """The transport drained."""
        self._transport_full = False
        super().resumeProducing()

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted found the request malformed (request line, header line, length, chunk
        size): answer C{400} with a reason and log it, where Twisted writes a bare status."""
        self._refuse(b"400 Bad Request", "malformed HTTP request", "malformed")

    def lineLengthExceeded(self, line: bytes) -> None:
        """One header line alone is over the limit."""
        self._refuse_head_too_large("request header line too long")

    def _refuse_head_too_large(self, reason: str) -> None:
        self._refuse(b"431 Request Header Fields Too Large", reason, "head_too_large")

    def _too_slow(self) -> None:
        self._request_deadline = None
        if self._in_body:
            self._refuse(
                b"408 Request Timeout", "request body not received in time", "body_too_slow"
            )
        else:
            self._refuse(
                b"408 Request Timeout", "request headers not received in time", "head_too_slow"
            )

    def _refuse(self, status: bytes, reason: str, counted_as: str) -> None:
        if self._refused:
            return  # answered and counted once
        self._refused = True
        self._disarm_request_deadline()
        self.metrics.refused(counted_as)
        self.log.info(
            "refused a request: {reason}",
            reason=reason,
            protocol="HTTP/1.1",
            client=getattr(self.transport.getPeer(), "host", None),  # type: ignore[union-attr]
        )
        self.transport.write(_refusal(status, reason))  # type: ignore[union-attr]
        # Unregisters this channel as the transport's producer first, or TLS would wait for
        # it before closing.
        self.loseConnection()
        # A client that does not read would keep the connection open while TLS waits to
        # flush the refusal.
        self._abort_call = self.callLater(_GRACE_SECONDS, self.transport.abortConnection)  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._disarm_request_deadline()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        super().connectionLost(reason)


class BatchingH2Connection(H2Connection):
    """Twisted's H2Connection, but sending in one reactor turn the DATA frames of every
    stream that has some, up to L{_H2_TURN_BYTES}, with one write to the transport.

    Twisted's loop sends one frame per reactor turn: a message for a hundred streams of a
    connection took a hundred turns, a hundred TLS records and a hundred socket writes. Here
    what the streams are given in one turn goes out in the next, together. The order and
    flow control are Twisted's: the same priority tree picks the next stream, each
    frame still respects the stream's window and the peer's frame size, and the loop waits
    while the transport is paused or no stream has data.
    """

    def _sendPrioritisedData(self, *args: object) -> None:
        if not self._stillProducing:
            return
        self.resetTimeout()
        sent = 0
        while sent < _H2_TURN_BYTES:
            try:
                stream = next(self.priority)
            except priority.DeadlockError:
                # Every stream is blocked or has nothing: wait until one gets data.
                self._write_frames()
                self._sendingDeferred = Deferred()
                self._sendingDeferred.addCallback(self._send_next_turn)
                return
            if self._consumerBlocked is not None:
                self._write_frames()
                self._consumerBlocked.addCallback(self._sendPrioritisedData)
                return
            size = self._send_frame(stream)
            if not size:
                # A stream whose window is shut: Twisted's loop tries again next turn.
                break
            sent += size
        self._write_frames()
        self._reactor.callLater(0, self._sendPrioritisedData)

    def _send_next_turn(self, stream: int) -> None:
        # Not at once: what the other streams get in this turn goes out with it.
        self._reactor.callLater(0, self._sendPrioritisedData)

    def _send_frame(self, stream: int) -> int:
        """Queue the next frame of ``stream`` in the h2 connection; return its size in bytes
        of data (the end of the stream counts as one), 0 if its window let nothing go."""
        queue = self._outboundStreamQueues[stream]
        frame = queue.popleft()
        if frame is _END_STREAM_SENTINEL:
            self.conn.end_stream(stream)
            # What the stream's end releases (a drain's GOAWAY) follows its frames.
            self._write_frames()
            self._requestDone(stream)
            return 1
        largest = min(
            self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(stream)
        )
        if len(frame) > largest:
            queue.appendleft(frame[largest:])
            frame = frame[:largest]
        if frame:
            self.conn.send_data(stream, frame)
        if not queue:
            self.priority.block(stream)
        if self.remainingOutboundWindow(stream) <= 0:
            self.streams[stream].flowControlBlocked()
        return len(frame)

    def _write_frames(self) -> None:
        frames = self.conn.data_to_send()
        if frames:
            self.transport.write(frames)  # type: ignore[union-attr]


# Twisted has no public way to end an HTTP/2 connection gracefully, nor to reach it: these
# private names are what DrainingChannelProtocol uses (see the list at the top).
class DrainingChannelProtocol(_GenericHTTPChannelProtocol):
    """A connection's protocol (HTTP/1.1 or HTTP/2) that can be drained: see L{drain}."""

    _lost = False

    def dataReceived(self, data: bytes) -> None:
        if self._negotiatedProtocol is None:
            transport = self._channel.transport
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2()
        super().dataReceived(data)

    def _switch_to_h2(self) -> None:
        """What Twisted does when ALPN chose HTTP/2, with a L{BatchingH2Connection}."""
        channel = self._channel
        assert isinstance(channel, HTTPChannel)
        network_producer = channel._networkProducer
        network_producer.unregisterProducer()
        channel.setTimeout(None)
        # Twisted's H2Connection has no type hints. Twisted gives it the global reactor;
        # this, the site's (the same one, but a test's clock in a test).
        h2: Any = BatchingH2Connection(getattr(self._factory, "reactor", None))
        h2.requestFactory = self._requestFactory
        h2.site = self._site
        h2.factory = self._factory
        h2.timeOut = self._timeOut
        h2.callLater = self._callLater
        h2.makeConnection(channel.transport)
        network_producer.registerProducer(h2, True)
        self._channel = h2
        self._negotiatedProtocol = b"h2"

    def drain(self) -> None:
        """Close this connection once its responses in progress have ended (ending them is
        the caller's business): an HTTP/1.1 one as L{LimitedHTTPChannel.drain} says, an
        HTTP/2 one with GOAWAY right after the end of its last stream.

        Not GOAWAY first, as RFC 9113 allows: clients built on the h2 library (httpx) fail
        every stream on a frame of data after GOAWAY, so they would never read the
        ``retry:``. The last stream's end and GOAWAY go out in the same reactor turn; a
        stream the client opens before is answered by the draining resource (no stream)."""
        if isinstance(self._channel, LimitedHTTPChannel):
            self._channel.drain()
        else:
            self._close_h2_when_idle()

    def _close_h2_when_idle(self) -> None:
        if self._lost:
            return
        # Twisted's H2Connection (twisted.web._http2), which has no type hints.
        channel: Any = self._channel
        ending = list(channel._streamCleanupCallbacks.values())
        if ending:
            # The streams' own Deferreds, their results passed on untouched.
            DeferredList(ending).addCallback(lambda _: self._close_h2_when_idle())
            return
        channel.conn.close_connection()
        transport = channel.transport
        transport.write(channel.conn.data_to_send())
        # H2Connection is the transport's producer: TLS would wait for it before closing.
        transport.unregisterProducer()
        transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._lost = True
        super().connectionLost(reason)


def limited_channel_protocol(
    max_header_bytes: int,
    request_timeout: float,
    max_body_bytes: int,
    metrics: Metrics,
) -> DrainingChannelProtocol:
    """One connection's protocol, as C{Site.protocol} builds it, but with a
    L{LimitedHTTPChannel}, and one that can be drained.

    Its class is based on Twisted's private one; it is what switches a connection to
    HTTP/2 when ALPN chose it, and C{Site} has no public way to change the channel.
    """
    return DrainingChannelProtocol(
        LimitedHTTPChannel(max_header_bytes, request_timeout, max_body_bytes, metrics)
    )
