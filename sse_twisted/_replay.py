"""The recent stream, kept in memory by user, so a reconnecting browser misses nothing.

Offsets are the stream queue's, identical on every instance reading it, so a browser can
resume on any instance with the ``Last-Event-ID`` another one gave it.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._framing import event_frame
from ._partitions import SINGLE, Partition

__all__ = ["DEFAULT_MAX_BYTES", "Replay", "ReplayWindow", "reset_frame"]


class _Retained(NamedTuple):
    offset: int
    topic: str | None
    frame: bytes


class _Unread(NamedTuple):
    """A message kept as it was consumed, for a user with no stream here when it came."""

    offset: int
    body: bytes


class _Refused(NamedTuple):
    """A kept message found invalid when a replay needed it: it holds its place only."""

    offset: int


Decode = Callable[[bytes, int], tuple[str | None, bytes] | None]
"""How the body of a message at an offset becomes its topic and event frame; None when it
is invalid (the callee says why)."""


class _Arrival(NamedTuple):
    received_at: float
    userid: str


@dataclass(frozen=True, slots=True)
class Replay:
    """What a reconnecting stream is sent before live events, and where live events start.

    @ivar resume_after: live events up to this offset are skipped (the browser has them).
    @ivar coverage_unknown: nothing consumed yet: whether events were missed is decided
        by the first one (L{ReplayWindow.covered_from} then becomes known).
    """

    frames: list[bytes]
    resume_after: int
    coverage_unknown: bool


def reset_frame(requested: str, resume_from: int | None, partition: Partition = SINGLE) -> bytes:
    """The ``reset`` event: the events after ``requested`` up to ``resume_from`` (an offset
    of ``partition``) are gone.

    Its id moves the browser's ``lastEventId`` to just before ``resume_from``, so that a
    later reconnection does not report the same gap again.
    """
    data = json.dumps({"lastEventId": requested, "resumeFrom": resume_from}).encode()
    event_id = partition.event_id(resume_from - 1) if resume_from is not None else None
    return event_frame(data, event_id, event="reset")


DEFAULT_MAX_BYTES = 32 * 1024 * 1024
"""The default of ``SSE_REPLAY_MAX_BYTES``."""

# Events evicted for their age in one reactor turn (about 0.3 ms): after a quiet spell the
# whole window ages at once, and evicting 100,000 events in one call held the reactor 40 ms.
_AGED_BATCH = 1000


class ReplayWindow:
    """Every event of the last ``max_age_seconds`` (at most ``max_events`` events and
    ``max_bytes`` bytes of frames), by user; the oldest go first, whichever bound is hit.

    ``covered_from`` is the lowest offset from which the window holds every event: the
    first one consumed since start, then one past the last evicted.

    Messages for users with no stream here are kept as consumed (L{record_unread}) and
    only validated and encoded by L{decode} when a replay needs them.

    @ivar bytes: the bytes of the retained frames and bodies (not Python's overhead for
        each event, about 250 bytes more: C{bench.replay_memory}).
    @ivar evicted: the running total of events evicted, for the stall log line.
    @ivar partition: the partition whose events these are, which also says how event ids
        are written.
    @ivar decode: turns a body kept by L{record_unread} into its topic and frame.
    """

    def __init__(
        self,
        clock: IReactorTime,
        max_age_seconds: float,
        max_events: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
        partition: Partition = SINGLE,
    ) -> None:
        self.partition = partition
        self._clock = clock
        self._max_age = max_age_seconds
        self._max_events = max_events
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evicted = 0
        self._aged_eviction: IDelayedCall | None = None
        self._arrivals: deque[_Arrival] = deque()
        self._by_user: dict[str, deque[_Retained | _Unread | _Refused]] = {}
        self.covered_from: int | None = None
        self.newest: int | None = None
        self.decode: Decode | None = None

    def __len__(self) -> int:
        return len(self._arrivals)

    def consumed(self, offset: int) -> None:
        """Note that the stream was read up to ``offset`` (also for a skipped message)."""
        if self.covered_from is None:
            self.covered_from = offset
        self.newest = offset

    def starts_after(self, tail: int) -> None:
        """Note that nothing up to ``tail`` was read back (it is older than the window):
        the window holds every event after it, none before."""
        if self.covered_from is None:
            self.covered_from = tail + 1
            self.newest = tail

    def clear(self) -> None:
        """Forget every event: the stream they came from no longer exists."""
        self._arrivals.clear()
        self._by_user.clear()
        self.bytes = 0
        self.covered_from = None
        self.newest = None

    def record(self, userid: str, topic: str | None, offset: int, frame: bytes) -> None:
        """Retain the event ``frame`` (already encoded, with its id) for ``userid``."""
        self._retain(userid, _Retained(offset, topic, frame), len(frame))

    def record_unread(self, userid: str, offset: int, body: bytes) -> None:
        """Retain the message ``body`` for ``userid`` as it is, to be validated and encoded
        by L{decode} only if a replay needs it."""
        self._retain(userid, _Unread(offset, body), len(body))

    def _retain(self, userid: str, event: _Retained | _Unread, size: int) -> None:
        now = self._clock.seconds()
        self.consumed(event.offset)
        self._arrivals.append(_Arrival(now, userid))
        events = self._by_user.get(userid)
        if events is None:
            events = self._by_user[userid] = deque()
        events.append(event)
        self.bytes += size
        self._evict(now)

    def _evict(self, now: float) -> None:
        """Evict over the count and byte bounds, then up to L{_AGED_BATCH} aged events; more
        aged ones go in later reactor turns (a replay may send them meanwhile: harmless)."""
        arrivals = self._arrivals
        while arrivals and (len(arrivals) > self._max_events or self.bytes > self.max_bytes):
            self._evict_oldest()
        oldest_allowed = now - self._max_age
        for _ in range(_AGED_BATCH):
            if not arrivals or arrivals[0].received_at >= oldest_allowed:
                return
            self._evict_oldest()
        if self._aged_eviction is None and arrivals and arrivals[0].received_at < oldest_allowed:
            self._aged_eviction = self._clock.callLater(0, self._evict_aged)

    def _evict_aged(self) -> None:
        self._aged_eviction = None
        self._evict(self._clock.seconds())

    def _evict_oldest(self) -> None:
        userid = self._arrivals.popleft().userid
        events = self._by_user[userid]
        # Each user's events are in stream order, so the oldest overall is its first.
        evicted = events.popleft()
        if not events:
            del self._by_user[userid]
        self.bytes -= _size(evicted)
        self.covered_from = evicted.offset + 1
        self.evicted += 1

    def replay(self, userid: str, topic: str, last_event_id: str) -> Replay:
        """The frames a stream resuming after ``last_event_id`` must get first.

        An id that is not an offset (of this partition), or older than the window, starts
        with a ``reset`` event; the user's retained events after it follow, oldest first.
        """
        self._evict(self._clock.seconds())
        after = self.partition.offset_of(last_event_id)
        frames: list[bytes] = []
        if after is None or (self.covered_from is not None and after + 1 < self.covered_from):
            frames.append(reset_frame(last_event_id, self.covered_from, self.partition))
            after = -1
        events = self._by_user.get(userid)
        for index, event in enumerate(events or ()):
            if event.offset <= after:
                continue
            if type(event) is _Unread:
                assert events is not None
                # Decoded once: the next replay finds the frame (or the refusal).
                event = events[index] = self._decoded(event)
            if type(event) is _Retained and (event.topic is None or event.topic == topic):
                frames.append(event.frame)
        return Replay(frames, after, coverage_unknown=self.covered_from is None and after >= 0)

    def _decoded(self, event: _Unread) -> _Retained | _Refused:
        assert self.decode is not None, "record_unread needs ReplayWindow.decode"
        decoded = self.decode(event.body, event.offset)
        self.bytes -= len(event.body)
        if decoded is None:
            return _Refused(event.offset)
        topic, frame = decoded
        self.bytes += len(frame)
        return _Retained(event.offset, topic, frame)


def _size(event: _Retained | _Unread | _Refused) -> int:
    if type(event) is _Retained:
        return len(event.frame)
    if type(event) is _Unread:
        return len(event.body)
    return 0
