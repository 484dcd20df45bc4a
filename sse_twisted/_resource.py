"""The HTTP front: ``GET /subscribe/{topic}/{userid}/{nonce}`` held open as an event stream."""

from __future__ import annotations

import math
import re
from typing import Any
from uuid import uuid4

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from ._admission import ChecksPerClient, RefusalLog
from ._bodies import BodyLimits, BoundedBodyRequest, ConnectionRequests
from ._channel import limited_channel_protocol
from ._client_address import Networks, client_address
from ._framing import comment_frame, jittered_retry_frame, retry_frame
from ._lifetime import stream_lifetime
from ._live import LiveStart
from ._metrics import Metrics
from ._paths import MASK, loggable_path
from ._replay import ReplayWindow
from ._streams import EventStream, StreamRegistry
from ._uuids import is_v4_uuid
from .interfaces import BackendBusy, BackendUnavailable, IAuthenticator

__all__ = ["EventStreamSite", "SubscribeResource", "TrackedRequest", "root_resource"]

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")
_PATH_PARTS = ("topic", "userid", "nonce")
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
        super().__init__(resource, requestFactory=TrackedRequest)
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
        client=_client_of(request),
        correlation_id=correlation_id,
    )


def _client_of(request: Request) -> str:
    """The real client address stamped by L{EventStreamSite}, else the TCP peer."""
    return getattr(request, "client_host", "") or str(
        getattr(request.getClientAddress(), "host", "")
    )


def _plain(request: Request, status: int, reason: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return reason.encode("utf-8") + b"\n"


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _plain(request, 404, "not found")


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


def _last_event_id(request: Request) -> str | None:
    """The id the browser resumes after: the header EventSource sends on reconnection, or
    a ``lastEventId`` query parameter for clients that cannot set headers."""
    header = request.getHeader(b"last-event-id")
    if header is None:
        values = (request.args or {}).get(b"lastEventId")
        header = values[0] if values else None
    if not header:
        return None
    return header.decode("utf-8", "replace")[:64]


def path_problem(parts: list[bytes]) -> str | None:
    """Why ``parts`` (the segments after /subscribe/) are not three v4 UUIDs, or None."""
    for name, part in zip(_PATH_PARTS, parts, strict=False):
        if not is_v4_uuid(part):
            return f"{name} is not a lowercase v4 UUID"
    if len(parts) < len(_PATH_PARTS):
        return f"missing {_PATH_PARTS[len(parts)]}: expected /subscribe/<topic>/<userid>/<nonce>"
    if len(parts) > len(_PATH_PARTS):
        return "unexpected path after nonce: expected /subscribe/<topic>/<userid>/<nonce>"
    return None


class SubscribeResource(Resource):
    """Authenticates a subscriber, then holds its request open as an event stream."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        registry: StreamRegistry,
        authenticator: IAuthenticator,
        reactor: IReactorTime,
        window: ReplayWindow,
        live: LiveStart,
        cors_origins: tuple[str, ...],
        retry_milliseconds: int,
        max_buffer_bytes: int,
        metrics: Metrics,
        max_streams_per_user: int = 16,
        max_streams: int = 50000,
        max_stream_seconds: float = math.inf,
        max_checks_per_client: int = 4,
        retry_jitter_milliseconds: int = 0,
    ) -> None:
        super().__init__()
        self._metrics = metrics
        self._registry = registry
        self._authenticator = authenticator
        self._clock = reactor
        self._window = window
        self._live = live
        self._cors_origins = cors_origins
        self._retry_milliseconds = retry_milliseconds
        self._max_buffer_bytes = max_buffer_bytes
        self._max_streams_per_user = max_streams_per_user
        self._max_streams = max_streams
        self._max_stream_seconds = max_stream_seconds
        self._checks_per_client = ChecksPerClient(max_checks_per_client)
        self._retry_jitter_milliseconds = retry_jitter_milliseconds
        self._refusals = RefusalLog(reactor)
        self._draining = False

    def drain(self) -> None:
        """From now on a subscribe gets no stream here: it is asked to come back (to
        another server), also one whose check is still waiting for the database."""
        self._draining = True

    def render(self, request: Request) -> bytes | int:
        """Dispatch by method; anything but GET and OPTIONS is 405."""
        if not self._apply_cors(request):
            self._metrics.subscribed("origin_refused")
            return _plain(request, 403, "origin not allowed")
        if request.method == b"GET":
            return self._subscribe(request)
        if request.method == b"OPTIONS":
            request.setResponseCode(204)
            request.setHeader(b"access-control-allow-methods", b"GET, OPTIONS")
            request.setHeader(b"access-control-allow-headers", b"Last-Event-ID, X-Request-ID")
            request.setHeader(b"access-control-max-age", b"86400")
            return b""
        request.setHeader(b"allow", b"GET, OPTIONS")
        return _plain(request, 405, "method not allowed: use GET")

    def _apply_cors(self, request: Request) -> bool:
        """Set the CORS headers; False when the request's origin is not allowed."""
        if "*" in self._cors_origins:
            request.setHeader(b"access-control-allow-origin", b"*")
            return True
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        if origin.decode("latin-1") not in self._cors_origins:
            return False
        request.setHeader(b"access-control-allow-origin", origin)
        return True

    def _subscribe(self, request: Request) -> bytes | int:
        parts = request.postpath or []
        problem = path_problem(parts)
        if problem is not None:
            self._metrics.subscribed("bad_request")
            return _plain(request, 400, problem)
        if self._draining:
            self._come_back_elsewhere(request)
            return NOT_DONE_YET
        topic, userid, nonce = (part.decode("ascii") for part in parts)
        # Checked before the database is asked (cheap refusals under a flood), and again
        # once it answered: other streams may have opened meanwhile.
        if self._refused_for_limits(request, userid):
            return NOT_DONE_YET
        client = _client_of(request)
        # Only checks that may reach PostgreSQL are limited: a cached grant costs no query,
        # and neither does a check joining one of the same pair in flight (a page opening
        # many tabs, or every tab of a user after a restart).
        counted = not self._authenticator.costs_no_query(userid, nonce)
        if counted and not self._checks_per_client.take(client):
            self._come_back_later(
                request, "too_many_checks", "too many subscriber checks from this address"
            )
            return NOT_DONE_YET
        checking = self._authenticator.is_subscriber(userid, nonce)
        if counted:
            checking.addBoth(self._check_over, client)
        finished = request.notifyFinish()
        finished.addErrback(self._client_left, checking)
        checking.addCallbacks(
            self._checked,
            self._unavailable,
            callbackArgs=(request, topic, userid, nonce, finished),
            errbackArgs=(request,),
        )
        checking.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    def _refused_for_limits(self, request: Request, userid: str) -> bool:
        """Answer 429 (and finish the request) when a stream limit is reached."""
        if len(self._registry) >= self._max_streams:
            reason, limit = "too many open streams on this server", self._max_streams
        elif self._registry.count_of(userid) >= self._max_streams_per_user:
            reason, limit = "too many open streams for this user", self._max_streams_per_user
        else:
            return False
        self._metrics.subscribed("too_many_streams")
        # Before the database answered, the userid segment may be a misplaced token; one
        # with open streams is a subscriber's.
        known = getattr(request, "authenticated", False) or self._registry.count_of(userid) > 0
        self.log.warn(
            "refused a stream of {userid}: {reason} (limit {limit})",
            userid=userid if known else MASK,
            reason=reason,
            limit=limit,
            correlation_id=getattr(request, "correlation_id", None),
        )
        request.setHeader(
            b"retry-after", str(math.ceil(self._retry_milliseconds / 1000)).encode("ascii")
        )
        request.write(_plain(request, 429, reason))
        request.finish()
        return True

    def _check_over(self, result: object, client: str) -> object:
        self._checks_per_client.give_back(client)
        return result

    def _client_left(self, reason: Failure, checking: Deferred[bool]) -> Failure | None:
        if checking.called:
            # The stream is open: let _closed see the disconnect.
            return reason
        self._metrics.subscribed("abandoned")
        checking.cancel()
        return None

    def _checked(
        self,
        allowed: bool,
        request: Request,
        topic: str,
        userid: str,
        nonce: str,
        finished: Deferred[None],
    ) -> None:
        if not allowed:
            self._metrics.subscribed("forbidden")
            request.write(_plain(request, 403, "unknown subscriber"))
            request.finish()
            return
        request.authenticated = True  # type: ignore[attr-defined]
        if self._draining:
            self._come_back_elsewhere(request)
            return
        if self._refused_for_limits(request, userid):
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        stream = EventStream(
            userid=userid,
            topic=topic,
            request=request,
            correlation_id=getattr(request, "correlation_id", ""),
            max_unsent_bytes=self._max_buffer_bytes,
            metrics=self._metrics,
            nonce=nonce,
            expires_at=self._clock.seconds() + stream_lifetime(self._max_stream_seconds),
        )
        self._metrics.subscribed("ok")
        # Sent at once, so that proxies and the browser see the stream open.
        head = [comment_frame("connected"), retry_frame(self._retry_milliseconds)]
        last_event_id = _last_event_id(request)
        replayed = 0
        if last_event_id is not None:
            # Replay and registration happen in one reactor turn: no live event can fall
            # between the two, and none is sent twice.
            replay = self._window.replay(userid, topic, last_event_id)
            head += replay.frames
            replayed = len(replay.frames)
            self._metrics.replay_events_sent.inc(replayed)
            stream.resume_after = replay.resume_after
            stream.coverage_unknown = replay.coverage_unknown
        head += self._live.start(stream, last_event_id)
        request.registerProducer(stream, True)
        self._registry.add(stream)
        finished.addBoth(self._closed, stream)
        stream.send_first(head)
        self.log.info(
            "stream opened for {userid} on {topic}",
            userid=userid,
            topic=topic,
            last_event_id=last_event_id,
            replayed=replayed,
            open_streams=len(self._registry),
            correlation_id=stream.correlation_id,
        )

    def _closed(self, result: Failure | None, stream: EventStream) -> None:
        stream.response_ended()
        self._registry.remove(stream)
        if isinstance(result, Failure):
            # The client went away: Site.log only sees requests the server finished.
            access_log(self._clock, stream.request, "client disconnected")

    def _unavailable(self, reason: Failure, request: Request) -> None:
        reason.trap(BackendUnavailable)
        if reason.check(BackendBusy):
            self._come_back_later(request, "auth_queue_full", reason.getErrorMessage())
            return
        self._metrics.subscribed("backend_unavailable")
        self.log.warn(
            "subscriber check unavailable, client asked to retry: {reason}",
            reason=reason.getErrorMessage(),
            correlation_id=getattr(request, "correlation_id", None),
        )
        self._retry_later(
            request, "backend unavailable, retry", retry_frame(self._retry_milliseconds)
        )

    def _come_back_later(self, request: Request, outcome: str, reason: str) -> None:
        """Refuse for load: counted as ``outcome``, logged as a summary (no access line: a
        flood would flood the log), retried later."""
        self._metrics.subscribed(outcome)
        if isinstance(request, TrackedRequest):
            request.access_logged = False
        self._refusals.refused(
            outcome, reason, _client_of(request), getattr(request, "correlation_id", None)
        )
        # The jitter spreads the comebacks of everyone refused in the same moment.
        self._retry_later(request, "server busy, retry", self._jittered_retry())

    def _come_back_elsewhere(self, request: Request) -> None:
        """The server is draining: the browser comes back after a jittered delay, and
        reaches another server (this one no longer accepts connections)."""
        self._metrics.subscribed("draining")
        self._retry_later(request, "server stopping, retry", self._jittered_retry())

    def _jittered_retry(self) -> bytes:
        return jittered_retry_frame(self._retry_milliseconds, self._retry_jitter_milliseconds)

    def _retry_later(self, request: Request, comment: str, retry: bytes) -> None:
        # EventSource never retries a non-200 answer; a 200 stream that ends at once
        # makes it come back after the retry delay.
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.write(retry + comment_frame(comment))
        request.finish()

    def _unexpected(self, reason: Failure, request: Request) -> None:
        if reason.check(CancelledError):
            return  # counted as abandoned
        self._metrics.subscribed("error")
        self.log.failure(
            "subscribe failed", reason, correlation_id=getattr(request, "correlation_id", None)
        )
        if not request.finished:
            request.write(_plain(request, 500, "internal error"))
            request.finish()


def root_resource(subscribe: SubscribeResource) -> Resource:
    """The URL tree: ``/subscribe/...``; every other path is a plain 404."""
    root = _Root()
    root.putChild(b"subscribe", subscribe)
    return root
