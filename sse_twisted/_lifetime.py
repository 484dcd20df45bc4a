"""A maximum stream lifetime: every stream ends, and its browser comes back re-checked.

A revocation missed by every instance (or applied by hand in the database without the
trigger) would otherwise leave a stream open for as long as the browser stays. Closing
each stream after about ``max_stream_seconds`` bounds that: the browser reconnects after
the ``retry:`` delay, is authenticated again, and resumes with its Last-Event-ID from the
replay window, so no event is lost.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from ._framing import id_frame, jittered_retry_frame
from ._replay import ReplayWindow
from ._streams import EventStream, StreamRegistry

__all__ = ["StreamLifetimeService", "stream_lifetime"]

# Streams opened together (every browser reconnecting after a deploy) expire spread over
# the last tenth of the lifetime, not in the same second.
_SHORTEST_SHARE = 0.9
_TICK_SECONDS = 1.0


def stream_lifetime(max_seconds: float) -> float:
    """How long one new stream may stay open: drawn in [0.9, 1.0] x ``max_seconds``."""
    return max_seconds * random.uniform(_SHORTEST_SHARE, 1.0)


class StreamLifetimeService(Service):
    """Once a second, closes the streams whose ``expires_at`` has passed.

    Each gets a jittered ``retry:`` and, when events were consumed since it opened without
    any being for it, an ``id:`` of the newest: its browser then resumes from there
    rather than from nothing. ``window_of`` gives the replay window of a userid's
    partition (None when it is not consumed here).
    """

    def __init__(
        self,
        registry: StreamRegistry,
        window_of: Callable[[str], ReplayWindow | None],
        clock: IReactorTime,
        retry_milliseconds: int,
        jitter_milliseconds: int,
    ) -> None:
        self._registry = registry
        self._window_of = window_of
        self._clock = clock
        self._retry_milliseconds = retry_milliseconds
        self._jitter_milliseconds = jitter_milliseconds
        self._loop = LoopingCall(self.close_expired)
        self._loop.clock = clock

    def startService(self) -> None:
        """Start checking, once a second."""
        super().startService()
        self._loop.start(_TICK_SECONDS, now=False)

    def stopService(self) -> Deferred[None] | None:
        """Stop checking."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return None

    def close_expired(self) -> int:
        """Close every open stream whose lifetime is over; return how many."""
        closed = 0
        for stream in self._registry.take_expired(self._clock.seconds()):
            if stream.is_open:
                stream.close(self._last_words(stream))
                closed += 1
        return closed

    def _last_words(self, stream: EventStream) -> bytes:
        words = b""
        window = self._window_of(stream.userid)
        newest = None if window is None else window.newest
        # Every event up to the newest consumed was written to this stream if it was for
        # it (live events are delivered as they are consumed), unless a backlog still held
        # some (closing drops it: the browser resumes after the last it got); one it already
        # has (it resumed ahead of this process) must not move its id back.
        if (
            window is not None
            and newest is not None
            and newest > stream.resume_after
            and not stream.backlogged
        ):
            words += id_frame(window.partition.event_id(newest))
        return words + jittered_retry_frame(self._retry_milliseconds, self._jitter_milliseconds)
