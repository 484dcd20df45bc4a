"""Open event streams, indexed by user and topic so that routing a message never scans."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from ._metrics import Metrics

__all__ = ["EventStream", "StreamRegistry"]

# What one write of the backlog joins (frames are sent whole, so a larger one goes alone).
# Above the 64,000 bytes TLS holds back until the reactor's next turn, so the transport's
# pause comes during the write that filled it, before the next one.
_BATCH_BYTES = 65536


@implementer(IPushProducer)
class EventStream:
    """One browser subscription: a held-open request for one user and topic.

    It is the request's producer: the transport pauses it when its buffer is full, and
    a stream that still gets more than ``max_unsent_bytes`` while paused is dropped
    rather than buffered without bound. The browser comes back with its Last-Event-ID.

    Its first frames (the head and the replay, L{send_first}) are a backlog that goes to
    the transport only as fast as the transport drains: a replay of any size reaches a
    browser that reads, and one that does not holds a transport buffer, not the replay.
    Live events written meanwhile queue behind it, in order, and are what counts towards
    ``max_unsent_bytes`` (the replay is what the browser asked for, not a sign that it
    stopped reading). A stream whose transport took nothing for a heartbeat interval while
    more than ``max_unsent_bytes`` waited for it is dropped too (L{keep_alive}): it would
    otherwise keep frames the window has let go.

    @ivar resume_after: the offset the browser already has; older live events are
        skipped (it may have got them from another instance that is ahead of this one).
    @ivar coverage_unknown: the stream resumed before this process consumed anything,
        so whether events were missed is decided when the first one arrives.
    @ivar nonce: the token the stream was let in with, kept (in memory only, never logged)
        to re-check the grant when a revocation may have been missed.
    @ivar expires_at: when (reactor seconds) the stream is closed for the browser to come
        back re-authenticated; infinite for no limit.
    @ivar ended: the response is over, finished or its client gone (L{response_ended}).
    """

    __slots__ = (
        "_backlog",
        "_backlog_bytes",
        "_replay_bytes",
        "_stalled_heartbeats",
        "correlation_id",
        "coverage_unknown",
        "ended",
        "expires_at",
        "max_unsent_bytes",
        "metrics",
        "nonce",
        "paused",
        "request",
        "resume_after",
        "topic",
        "unsent_bytes",
        "userid",
    )
    log = Logger()

    def __init__(
        self,
        userid: str,
        topic: str,
        request: Request,
        correlation_id: str,
        max_unsent_bytes: int,
        resume_after: int = -1,
        metrics: Metrics | None = None,
        nonce: str = "",
        expires_at: float = math.inf,
    ) -> None:
        self.metrics = metrics
        self.userid = userid
        self.nonce = nonce
        self.expires_at = expires_at
        self.topic = topic
        self.request = request
        self.correlation_id = correlation_id
        self.max_unsent_bytes = max_unsent_bytes
        self.resume_after = resume_after
        self.coverage_unknown = False
        self.ended = False
        self.paused = False
        self.unsent_bytes = 0
        # Frames not yet handed to the transport: references to the window's shared
        # bytes, never copies. The first _replay_bytes of it are the replay. None while
        # empty, as for almost every stream: an empty deque costs about 600 bytes.
        self._backlog: deque[bytes] | None = None
        self._backlog_bytes = 0
        self._replay_bytes = 0
        # Heartbeats met with a backlog since the transport last asked for more.
        self._stalled_heartbeats = 0

    def __repr__(self) -> str:
        return f"<EventStream {self.userid} {self.topic} {self.correlation_id}>"

    @property
    def is_open(self) -> bool:
        """Whether the response can still be written to."""
        return not self.ended and not self.request.finished

    def response_ended(self) -> None:
        """The request's C{notifyFinish} fired: the response was finished, or its connection
        lost (Twisted fires it from the request's C{connectionLost}, which nothing else tells
        a resource of). Nothing is written to the stream from now on."""
        self.ended = True

    @property
    def backlogged(self) -> bool:
        """Whether frames still wait to go to the transport (a replay being paced out)."""
        return bool(self._backlog)

    def write(self, frame: bytes) -> None:
        """Queue bytes on the connection; drop the connection of a client that stopped reading."""
        if self._backlog:
            self._backlog.append(frame)
            self._backlog_bytes += len(frame)
            # What is queued behind the replay, unlike the replay, is over what was asked.
            self.unsent_bytes = self._backlog_bytes - self._replay_bytes
        elif self.paused:
            self.unsent_bytes += len(frame)
        if self.unsent_bytes > self.max_unsent_bytes:
            self._drop_slow_client()
        elif not self._backlog:
            self.request.write(frame)

    def keep_alive(self, frame: bytes) -> None:
        """Write the heartbeat ``frame``, or drop the stream if its client took nothing of
        a backlog over ``max_unsent_bytes`` for the last two heartbeats."""
        if self._backlog:
            # Heartbeats are spread over their interval, in an order that may change from
            # one round to the next: only two of them apart are a whole interval apart.
            if self._stalled_heartbeats >= 2 and self._backlog_bytes > self.max_unsent_bytes:
                self._drop_slow_client()
                return
            self._stalled_heartbeats += 1
        self.write(frame)

    def send_first(self, frames: Iterable[bytes]) -> None:
        """Write ``frames`` (the response's head and the replay) as fast as the transport
        takes them; what L{write} gets meanwhile follows them."""
        if self._backlog is None:
            self._backlog = deque()
        for frame in frames:
            self._backlog.append(frame)
            self._backlog_bytes += len(frame)
        self._replay_bytes = self._backlog_bytes
        self._write_backlog()

    def _write_backlog(self) -> None:
        """Hand the backlog to the transport, a batch at a time, until it pauses us."""
        backlog = self._backlog
        while backlog and not self.paused and not self.request.finished:
            batch = [backlog.popleft()]
            size = len(batch[0])
            while backlog and size + len(backlog[0]) <= _BATCH_BYTES:
                frame = backlog.popleft()
                batch.append(frame)
                size += len(frame)
            self._backlog_bytes -= size
            self._replay_bytes = max(0, self._replay_bytes - size)
            self.unsent_bytes = self._backlog_bytes - self._replay_bytes
            # Joined: one chunk on the wire per batch, and one copy of at most a batch.
            self.request.write(b"".join(batch))
        if not backlog:
            self._backlog = None

    def _forget_backlog(self) -> None:
        self._backlog = None
        self._backlog_bytes = self._replay_bytes = 0

    def close(self, last_words: bytes = b"") -> None:
        """Write ``last_words`` (e.g. a new retry delay), then end the response; the
        browser reconnects after its retry delay."""
        self._forget_backlog()
        if self.is_open:
            if last_words:
                self.request.write(last_words)
            self.request.unregisterProducer()
            self.request.finish()

    def _drop_slow_client(self) -> None:
        self._forget_backlog()
        if self.metrics is not None:
            self.metrics.slow_client_disconnects.inc()
        self.log.warn(
            "dropped a stream of {userid}: over {limit} bytes unsent to a client not reading",
            userid=self.userid,
            limit=self.max_unsent_bytes,
            correlation_id=self.correlation_id,
        )
        channel = self.request.channel
        # An HTTP/2 stream resets only itself; an HTTP/1.1 stream is its whole connection.
        abort = getattr(channel, "abortConnection", None)
        if abort is None:
            abort = channel.transport.abortConnection  # type: ignore[union-attr]
        abort()

    def pauseProducing(self) -> None:
        """The transport's buffer is full: count what is written from now on."""
        self.paused = True

    def resumeProducing(self) -> None:
        """The transport drained its buffer: write the backlog, if any, until it is full."""
        self.paused = False
        self._stalled_heartbeats = 0
        self.unsent_bytes = self._backlog_bytes - self._replay_bytes
        self._write_backlog()

    def stopProducing(self) -> None:
        """The connection is gone; the registry forgets the stream on the request's finish."""
        self._forget_backlog()


class StreamRegistry:
    """The open streams of this process, by userid then topic, and by expiry second."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, set[EventStream]]] = {}
        self._uncovered: set[EventStream] = set()
        self._count = 0
        # Streams by the whole second they expire in, and those seconds in a heap: taking
        # the expired costs O(expired), removing a stream O(1).
        self._expiring: dict[int, set[EventStream]] = {}
        self._expiry_seconds: list[int] = []

    def __len__(self) -> int:
        return self._count

    def add(self, stream: EventStream) -> None:
        """Start routing the user's messages to ``stream``."""
        topics = self._by_user.setdefault(stream.userid, {})
        topics.setdefault(stream.topic, set()).add(stream)
        self._count += 1
        if stream.coverage_unknown:
            self._uncovered.add(stream)
        if not math.isinf(stream.expires_at):
            second = math.ceil(stream.expires_at)
            expiring = self._expiring.get(second)
            if expiring is None:
                expiring = self._expiring[second] = set()
                heapq.heappush(self._expiry_seconds, second)
            expiring.add(stream)

    def remove(self, stream: EventStream) -> None:
        """Stop routing to ``stream``; removing an unknown stream does nothing."""
        topics = self._by_user.get(stream.userid)
        if topics is None:
            return
        streams = topics.get(stream.topic)
        if streams is None or stream not in streams:
            return
        streams.discard(stream)
        self._uncovered.discard(stream)
        self._count -= 1
        if not math.isinf(stream.expires_at):
            # An emptied second stays until take_expired reaches it.
            self._expiring.get(math.ceil(stream.expires_at), set()).discard(stream)
        if not streams:
            del topics[stream.topic]
            if not topics:
                del self._by_user[stream.userid]

    def count_of(self, userid: str) -> int:
        """How many streams ``userid`` holds, over all topics (no copy is made)."""
        return sum(len(streams) for streams in self._by_user.get(userid, {}).values())

    def streams_of(self, userid: str, topic: str | None = None) -> list[EventStream]:
        """The user's streams, only those on ``topic`` when it is given."""
        topics = self._by_user.get(userid)
        if topics is None:
            return []
        if topic is not None:
            return list(topics.get(topic, ()))
        return [stream for streams in topics.values() for stream in streams]

    def __iter__(self) -> Iterator[EventStream]:
        return iter(
            [stream for topics in self._by_user.values() for s in topics.values() for stream in s]
        )

    def take_expired(self, now: float) -> list[EventStream]:
        """The streams whose lifetime is over at ``now``, each returned once."""
        expired: list[EventStream] = []
        while self._expiry_seconds and self._expiry_seconds[0] <= now:
            expired.extend(self._expiring.pop(heapq.heappop(self._expiry_seconds)))
        return expired

    def take_uncovered(self, users: Callable[[str], bool] | None = None) -> list[EventStream]:
        """The streams still waiting to learn whether they missed events (only those of
        the ``users`` it says, when given), now settled."""
        streams = [s for s in self._uncovered if users is None or users(s.userid)]
        self._uncovered.difference_update(streams)
        for stream in streams:
            stream.coverage_unknown = False
        return streams

    def deliver(self, userid: str, topic: str | None, offset: int, frame: bytes) -> int:
        """Write event ``frame`` (at ``offset``) to each stream of the user (and topic) that
        does not have it yet; return how many were written."""
        delivered = 0
        # A copy: a write can drop a slow client, which removes it from the registry.
        for stream in self.streams_of(userid, topic):
            if offset > stream.resume_after:
                stream.write(frame)
                delivered += 1
        return delivered
