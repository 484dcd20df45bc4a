"""``GET /subscribe/{topic}/{userid}/{nonce}``: check the subscriber, then hold the request
open as an event stream (with what the browser missed replayed first), or say when to come
back."""

from __future__ import annotations

import math

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ._admission import ChecksPerClient, RefusalLog
from ._config import Config
from ._cors import CrossOrigin
from ._framing import comment_frame, jittered_retry_frame, retry_frame
from ._lifetime import stream_lifetime
from ._metrics import Metrics
from ._paths import MASK
from ._resource import plain_answer
from ._shard import LocalPartition, LocalPartitions
from ._site import TrackedRequest, access_log, client_of, release_request_state
from ._streams import EventStream, StreamRegistry
from ._uuids import is_v4_uuid
from .interfaces import BackendBusy, BackendUnavailable, IAuthenticator

__all__ = ["SubscribeResource", "path_problem"]

_PATH_PARTS = ("topic", "userid", "nonce")


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
        config: Config,
        registry: StreamRegistry,
        authenticator: IAuthenticator,
        reactor: IReactorTime,
        partitions: LocalPartitions,
        metrics: Metrics,
    ) -> None:
        """Limits, CORS origins and retry delays come from ``config``; each user is served
        from the replay window and live start of its partition, among ``partitions``."""
        super().__init__()
        self._config = config
        self._metrics = metrics
        self._registry = registry
        self._authenticator = authenticator
        self._clock = reactor
        self._partitions = partitions
        self._cors = CrossOrigin(config.cors_origins)
        self._checks_per_client = ChecksPerClient(config.max_auth_checks_per_client)
        self._refusals = RefusalLog(reactor)
        self._draining = False

    def drain(self) -> None:
        """From now on a subscribe gets no stream here: it is asked to come back (to
        another server), also one whose check is still waiting for the database."""
        self._draining = True

    def render(self, request: Request) -> bytes | int:
        """Dispatch by method; anything but GET and OPTIONS is 405."""
        if not self._cors.allow(request):
            self._metrics.subscribed("origin_refused")
            return plain_answer(request, 403, "origin not allowed")
        if request.method == b"GET":
            return self._subscribe(request)
        if request.method == b"OPTIONS":
            return self._cors.preflight(request)
        request.setHeader(b"allow", b"GET, OPTIONS")
        return plain_answer(request, 405, "method not allowed: use GET")

    def _subscribe(self, request: Request) -> bytes | int:
        parts = request.postpath or []
        problem = path_problem(parts)
        if problem is not None:
            self._metrics.subscribed("bad_request")
            return plain_answer(request, 400, problem)
        if self._draining:
            self._come_back_elsewhere(request)
            return NOT_DONE_YET
        topic, userid, nonce = (part.decode("ascii") for part in parts)
        partition = self._partitions.of(userid)
        if partition is None:
            self._wrong_shard(request, userid)
            return NOT_DONE_YET
        # Checked before the database is asked (cheap refusals under a flood), and again
        # once it answered: other streams may have opened meanwhile.
        if self._refused_for_limits(request, userid):
            return NOT_DONE_YET
        client = client_of(request)
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
            callbackArgs=(request, topic, userid, nonce, finished, partition),
            errbackArgs=(request,),
        )
        checking.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    def _refused_for_limits(self, request: Request, userid: str) -> bool:
        """Answer 429 (and finish the request) when a stream limit is reached."""
        if len(self._registry) >= self._config.max_streams:
            reason, limit = "too many open streams on this server", self._config.max_streams
        elif self._registry.count_of(userid) >= self._config.max_streams_per_user:
            reason, limit = "too many open streams for this user", self._config.max_streams_per_user
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
            b"retry-after", str(math.ceil(self._config.retry_milliseconds / 1000)).encode("ascii")
        )
        request.write(plain_answer(request, 429, reason))
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
        partition: LocalPartition,
    ) -> None:
        if not allowed:
            self._metrics.subscribed("forbidden")
            request.write(plain_answer(request, 403, "unknown subscriber"))
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
            max_unsent_bytes=self._config.max_buffer_bytes,
            metrics=self._metrics,
            nonce=nonce,
            expires_at=self._clock.seconds() + stream_lifetime(self._config.max_stream_seconds),
        )
        self._metrics.subscribed("ok")
        # Sent at once, so that proxies and the browser see the stream open.
        head = [comment_frame("connected"), retry_frame(self._config.retry_milliseconds)]
        last_event_id = _last_event_id(request)
        replayed = 0
        if last_event_id is not None:
            # Replay and registration happen in one reactor turn: no live event can fall
            # between the two, and none is sent twice.
            replay = partition.window.replay(userid, topic, last_event_id)
            head += replay.frames
            replayed = len(replay.frames)
            self._metrics.replay_events_sent.inc(replayed)
            stream.resume_after = replay.resume_after
            stream.coverage_unknown = replay.coverage_unknown
        head += partition.live.start(stream, last_event_id)
        request.registerProducer(stream, True)
        self._registry.add(stream)
        finished.addBoth(self._closed, stream)
        stream.send_first(head)
        release_request_state(request)
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
            request, "backend unavailable, retry", retry_frame(self._config.retry_milliseconds)
        )

    def _come_back_later(self, request: Request, outcome: str, reason: str) -> None:
        """Refuse for load: counted as ``outcome``, logged as a summary (no access line: a
        flood would flood the log), retried later."""
        self._metrics.subscribed(outcome)
        if isinstance(request, TrackedRequest):
            request.access_logged = False
        self._refusals.refused(
            outcome, reason, client_of(request), getattr(request, "correlation_id", None)
        )
        # The jitter spreads the comebacks of everyone refused in the same moment.
        self._retry_later(request, "server busy, retry", self._jittered_retry())

    def _wrong_shard(self, request: Request, userid: str) -> None:
        """The user lives in a partition this server does not consume: the load balancer
        sent it to the wrong shard. A 200 that ends at once, as when busy (a non-200 would
        stop the EventSource for good), so it comes back and can be routed right; counted,
        and logged (as a summary under a flood). The userid is not logged: it is not
        authenticated, and may be a misplaced token."""
        if isinstance(request, TrackedRequest):
            request.access_logged = False
        self._metrics.subscribed("wrong_shard")
        reason = (
            f"the user lives in partition {self._partitions.partition_of(userid)} of "
            f"{self._partitions.count}, not among this server's partitions "
            f"{self._partitions.describe()}: the load balancer routes it to the wrong shard"
        )
        self._refusals.refused(
            "wrong_shard", reason, client_of(request), getattr(request, "correlation_id", None)
        )
        self._retry_later(request, "not this server's partition, retry", self._jittered_retry())

    def _come_back_elsewhere(self, request: Request) -> None:
        """The server is draining: the browser comes back after a jittered delay, and
        reaches another server (this one no longer accepts connections)."""
        self._metrics.subscribed("draining")
        self._retry_later(request, "server stopping, retry", self._jittered_retry())

    def _jittered_retry(self) -> bytes:
        return jittered_retry_frame(
            self._config.retry_milliseconds, self._config.reconnect_jitter_milliseconds
        )

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
            request.write(plain_answer(request, 500, "internal error"))
            request.finish()
