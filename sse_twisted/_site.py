"""The HTTP site: each request stamped with its id, start time and client address, and
logged as one JSON access line when it ends."""

from __future__ import annotations

import re
from typing import Any
from uuid import uuid4

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ._bodies import BodyLimits, BoundedBodyRequest, ConnectionRequests
from ._channel import limited_channel_protocol
from ._client_address import Networks, client_address
from ._metrics import Metrics
from ._paths import loggable_path

__all__ = ["EventStreamSite", "TrackedRequest", "access_log", "client_of", "release_request_state"]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_access = Logger(namespace="sse_twisted.access")


class TrackedRequest(BoundedBodyRequest):
    """A request with the correlation id, start time and client address its log lines
    carry."""

    correlation_id: str = ""
    started_at: float = 0.0
    # The real client address (Request.client is Twisted's peer address).
    client_host: str = ""
    # False for a refusal under load: those are summarised, not logged one by one.
    access_logged: bool = True
    # The path's userid and token are a known pair: its userid is not a misplaced token.
    authenticated: bool = False

    def __repr__(self) -> str:
        """Twisted logs a request's repr (a HEAD answered with a body): the path in it is
        masked as in the access log, and the query string left out."""
        method = self.method.decode("latin-1")
        path = loggable_path(self.path or b"", self.authenticated)
        return f"<{type(self).__name__} at 0x{id(self):x} method={method} path={path}>"


class EventStreamSite(Site):
    """A L{Site} that stamps each request and writes a JSON access log line for it.

    Never wrap it in gzip encoding: Twisted's encoder buffers, and events would stall.
    """

    requestFactory = TrackedRequest
    noisy = False

    def __init__(
        self,
        resource: Resource,
        reactor: IReactorTime,
        metrics: Metrics,
        max_header_bytes: int = 8192,
        request_timeout: float = 10.0,
        max_body_bytes: int = 1024,
        trusted_proxies: Networks = (),
    ) -> None:
        super().__init__(resource, requestFactory=TrackedRequest, reactor=reactor)
        self._clock = reactor
        self._trusted_proxies = trusted_proxies
        self._max_header_bytes = max_header_bytes
        self._request_timeout = request_timeout
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics

    def protocol(self) -> Any:
        """Each connection's channel: HTTP/1.1 request heads get 431 past the size limit,
        bodies 413, requests 408 past the deadline (L{Factory.buildProtocol} calls this)."""
        return limited_channel_protocol(
            self._max_header_bytes, self._request_timeout, self._max_body_bytes, self._metrics
        )

    def buildProtocol(self, addr: IAddress | None) -> Any:
        """A connection whose requests share one L{BodyLimits}: an HTTP/2 connection logs
        its first refused stream, not each one."""
        protocol = super().buildProtocol(addr)
        if protocol is not None:
            limits = BodyLimits(
                self._max_body_bytes, self._request_timeout, self._clock, self._metrics
            )
            protocol.requestFactory = ConnectionRequests(TrackedRequest, limits)
        return protocol

    def getResourceFor(self, request: Request) -> Resource:
        """Stamp ``request`` with a correlation id, its start time and its client address,
        then route it."""
        assert isinstance(request, TrackedRequest)
        request.client_host = client_address(request, self._trusted_proxies)
        given = request.getHeader(b"x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            request.correlation_id = given.decode("ascii")
        else:
            request.correlation_id = uuid4().hex
        request.started_at = self._clock.seconds()
        request.setHeader(b"x-request-id", request.correlation_id.encode("ascii"))
        return super().getResourceFor(request)

    def log(self, request: Request) -> None:  # type: ignore[override]
        """One access-log line per finished request; the token in the path is masked."""
        if getattr(request, "access_logged", True):
            access_log(self._clock, request, "request finished")


def access_log(clock: IReactorTime, request: Request, outcome: str) -> None:
    """Log ``request`` as one access line: status, duration, bytes, protocol, masked path
    (see L{loggable_path}; the query string is left out)."""
    correlation_id = getattr(request, "correlation_id", None)
    started_at = getattr(request, "started_at", clock.seconds())
    _access.info(
        "{method} {path} {status} ({outcome})",
        method=request.method.decode("latin-1"),
        path=loggable_path(request.path, getattr(request, "authenticated", False)),
        status=request.code,
        outcome=outcome,
        duration_ms=round((clock.seconds() - started_at) * 1000, 1),
        bytes=request.sentLength,
        protocol=request.clientproto.decode("latin-1"),
        client=client_of(request),
        correlation_id=correlation_id,
    )


def client_of(request: Request) -> str:
    """The real client address stamped by L{EventStreamSite}, else the TCP peer."""
    return getattr(request, "client_host", "") or str(
        getattr(request.getClientAddress(), "host", "")
    )


def release_request_state(request: Request) -> None:
    """Let go of what only answering ``request`` needed, once its response has begun.

    An event stream stays open for hours and reads none of it again: its request and
    response headers, query arguments, cookies, (empty) body and split path, about 2.1 KB
    of each idle stream (bench/RESULTS.md, "Memory per idle stream"). The access line at
    its end reads method, path, status, byte count and protocol, all kept.
    """
    request.requestHeaders = Headers()
    # Not before the head is written: it is built from them. (Twisted's http.Request has
    # startedWriting; IRequest does not promise it.)
    if getattr(request, "startedWriting", False):
        request.responseHeaders = Headers()
    request.args = {}
    request.received_cookies = {}
    request.cookies = []
    request.content = None
    request.prepath = []
    request.postpath = []
