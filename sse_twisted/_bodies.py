"""Request bodies: nothing this server serves takes one, so a body is kept in memory up to
a small limit, and a request whose body passes it is refused at once.

Twisted spools a body of unknown length, or over 100 KB, to a temporary file, reads it to
its end before the resource sees the request, and gives it no deadline. Here no body ever
goes to disk. Over HTTP/1.1 the channel (L{sse_twisted._channel.LimitedHTTPChannel})
refuses with C{413} and closes the connection; this module counts a chunked body's bytes
for it. Over HTTP/2 a stream whose body passes the limit, or is not complete within the
request deadline, is reset (C{RST_STREAM}); the connection and its other streams go on.
Twisted answers nothing but a reset there without its private names.

Only public Twisted names: C{Request.gotLength}, C{handleContentChunk} and
C{requestReceived} (what both channels call on a request), the HTTP/2 stream's
C{abortConnection} (its C{ITransport}), and C{INonQueuedRequestFactory}.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.server import Request
from zope.interface import implementer

from ._channel import LimitedHTTPChannel
from ._metrics import Metrics
from ._server_name import NamedServerRequest

__all__ = ["BodyLimits", "BoundedBodyRequest", "ConnectionRequests"]


class _Stream(Protocol):
    """What an HTTP/2 request's channel (Twisted's C{H2Stream}) offers a refusal."""

    def abortConnection(self) -> None: ...


class BodyLimits:
    """The body limit and request deadline of one connection's requests; a refusal on the
    connection is counted each time and logged once."""

    log = Logger()

    def __init__(
        self, max_body_bytes: int, request_timeout: float, clock: IReactorTime, metrics: Metrics
    ) -> None:
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.clock = clock
        self.metrics = metrics
        self._logged = False

    def refused(self, request: Request, reason: str, counted_as: str) -> None:
        """Count one HTTP/2 stream refused for ``reason``; log the connection's first."""
        self.metrics.refused(counted_as)
        if self._logged:
            return
        self._logged = True
        self.log.info(
            "refused a request: {reason}",
            reason=reason,
            protocol="HTTP/2",
            client=getattr(request.getClientAddress(), "host", None),
        )


class BoundedBodyRequest(NamedServerRequest):
    """A request whose body is held in memory and bounded by its L{BodyLimits}."""

    body_limits: BodyLimits
    _body_bytes = 0
    _body_refused = False
    _lost = False
    _stream_deadline: IDelayedCall | None = None
    _stream_reset: IDelayedCall | None = None

    def gotLength(self, length: int | None) -> None:
        """Keep the body in memory: never more than the limit is written to it.

        Over HTTP/2 this is called as the stream is built, from its headers: the stream's
        deadline starts here, and a declared length over the limit is refused at once.
        """
        self.content = BytesIO()
        if isinstance(self.channel, HTTPChannel):
            return  # HTTP/1.1: the channel checks the declared length and the deadline.
        self._stream_deadline = self.body_limits.clock.callLater(
            self.body_limits.request_timeout, self._stream_too_slow
        )
        if length is not None and length > self.body_limits.max_body_bytes:
            self._refuse_stream("request body too large", "body_too_large")

    def handleContentChunk(self, data: bytes) -> None:
        """Keep ``data`` unless the body passes the limit with it: then refuse the request."""
        if self._body_refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes <= self.body_limits.max_body_bytes:
            super().handleContentChunk(data)
        elif isinstance(self.channel, LimitedHTTPChannel):
            self._body_refused = True
            self.channel.refuse_body_too_large()
        else:
            self._refuse_stream("request body too large", "body_too_large")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Handle the complete request, unless its stream was refused."""
        if self._body_refused:
            return
        self._cancel_stream_calls()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        """Cancel this stream's deadline and pending reset."""
        self._lost = True
        self._cancel_stream_calls()
        super().connectionLost(reason)

    def _stream_too_slow(self) -> None:
        self._stream_deadline = None
        self._refuse_stream("request body not received in time", "body_too_slow")

    def _refuse_stream(self, reason: str, counted_as: str) -> None:
        """Reset this HTTP/2 stream on the next reactor turn.

        Not at once: Twisted may still hold events of this stream from the same read (or
        be building it), and fails on a stream it has forgotten. Until then its data is
        dropped; Twisted acknowledges it as usual, so that the connection's flow-control
        window, which every stream shares, stays open (h2 does the same for data that
        arrives after the reset).
        """
        if self._body_refused:
            return
        self._body_refused = True
        self._cancel_stream_calls()
        self.body_limits.refused(self, reason, counted_as)
        self._stream_reset = self.body_limits.clock.callLater(0, self._reset_stream)

    def _reset_stream(self) -> None:
        self._stream_reset = None
        if not self._lost:
            cast(_Stream, self.channel).abortConnection()

    def _cancel_stream_calls(self) -> None:
        for call in (self._stream_deadline, self._stream_reset):
            if call is not None and call.active():
                call.cancel()
        self._stream_deadline = self._stream_reset = None


@implementer(INonQueuedRequestFactory)
class ConnectionRequests:
    """Builds the requests of one connection (HTTP/1.1 or HTTP/2), sharing its
    L{BodyLimits}; a C{Site} puts one on each connection it builds."""

    def __init__(self, request_class: type[BoundedBodyRequest], limits: BodyLimits) -> None:
        self._request_class = request_class
        self._limits = limits

    def __call__(self, channel: Any, queued: object = False) -> BoundedBodyRequest:
        """A request on ``channel``; ``queued`` (which HTTP/2 passes) is long obsolete."""
        request = self._request_class(channel)
        request.body_limits = self._limits
        return request
