"""Where each new stream's live events start, and the streams waiting to know it.

A stream without ``Last-Event-ID`` gets only what is published after it opened. Right
after start the consumer reads back the replay window first: until it knows the stream's
tail (the newest offset published before it attached), such a stream is held (nothing
written to it), then it starts at the tail. A ``Last-Event-ID`` past the newest offset
consumed waits a short grace for the consumer to pass it, then gets a ``reset`` event and
live events (the id came from a stream that no longer exists, or from elsewhere).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ._framing import id_frame
from ._partitions import SINGLE, Partition
from ._replay import ReplayWindow, reset_frame
from ._streams import EventStream, StreamRegistry

__all__ = ["LiveStart", "settle_uncovered"]

# resume_after of a held stream: no offset is above it, so nothing is written to it.
_HELD = 2**63


def settle_uncovered(
    registry: StreamRegistry, first_offset: int, partition: Partition = SINGLE
) -> None:
    """The window of ``partition`` now holds every event from ``first_offset`` on: its
    users' streams that resumed before that was known and are behind it get a ``reset``
    for what they missed."""
    for stream in registry.take_uncovered(_users_of(partition)):
        if stream.resume_after + 1 < first_offset:
            requested = str(partition.event_id(stream.resume_after))
            stream.write(reset_frame(requested, first_offset, partition))


def _users_of(partition: Partition) -> Callable[[str], bool] | None:
    """Which userids ``partition`` holds; None for all of them."""
    return None if partition.count == 1 else partition.holds


class LiveStart:
    """Decide where a new stream starts, and settle the streams that must wait.

    Fed by the consumer: L{tail_known} (the read-back ends at ``tail``), L{caught_up}
    (it has read the read-back) and L{new_stream} (the queue was re-created). Offsets and
    streams are those of the window's partition (all of them with one partition).

    @ivar tail: the newest offset published before the consumer attached, or None while
        unknown (-1 when the stream was empty).
    @ivar is_caught_up: whether the consumer has read everything up to the tail.
    """

    log = Logger()

    def __init__(
        self,
        registry: StreamRegistry,
        window: ReplayWindow,
        clock: IReactorTime,
        future_id_grace_seconds: float,
    ) -> None:
        self._registry = registry
        self._window = window
        self._partition = window.partition
        self._clock = clock
        self._grace = future_id_grace_seconds
        self.tail: int | None = None
        self.is_caught_up = False
        self._held: set[EventStream] = set()
        self._ahead: list[tuple[EventStream, str]] = []

    def start(self, stream: EventStream, last_event_id: str | None) -> list[bytes]:
        """Set where ``stream`` (whose replay is done) starts; return the frames to send
        before registering it: at most an ``id:`` line, none while it is held."""
        # Everything up to the position sent was consumed (or read back) before this stream
        # existed: a browser that reconnects before its first event resumes from there, not
        # from nothing (an id with no data sets lastEventId without dispatching an event).
        newest = -1 if self._window.newest is None else self._window.newest
        if last_event_id is None:
            if self.tail is None:
                stream.resume_after = _HELD
                self._held.add(stream)
                return []
            stream.resume_after = self.tail
            position = max(self.tail, newest)
            return [self._id_frame(position)] if position >= 0 else []
        if stream.resume_after > newest:
            self._wait_for(stream, last_event_id)
            return []
        return [self._id_frame(newest)] if newest > stream.resume_after else []

    def _id_frame(self, offset: int) -> bytes:
        return id_frame(self._partition.event_id(offset))

    def _text_id(self, offset: int | None) -> str:
        return str(offset if offset is None else self._partition.event_id(offset))

    def tail_known(self, tail: int) -> None:
        """The read-back ends at ``tail``: held streams start there, getting what the
        consumer already read past it from the replay window."""
        self.tail = tail
        held, self._held = self._held, set()
        for stream in held:
            if not stream.is_open:
                continue
            frames = self._id_frame(tail) if tail >= 0 else b""
            if self._window.newest is not None and self._window.newest > tail:
                replay = self._window.replay(stream.userid, stream.topic, self._text_id(tail))
                frames += b"".join(replay.frames)
            stream.resume_after = tail
            if frames:
                stream.write(frames)

    def nothing_read_back(self, newest: int) -> None:
        """The read-back found nothing: the stream's newest offset (-1: none) is older than
        the window, which holds everything after it. Known now, not at the next message, so
        that a browser resuming behind it gets its ``reset`` as its first event."""
        if newest >= 0 and self._window.covered_from is None:
            self._window.starts_after(newest)
            settle_uncovered(self._registry, newest + 1, self._partition)

    def caught_up(self) -> None:
        """The consumer has read the read-back: the grace of ids from ahead starts now."""
        self.is_caught_up = True
        ahead, self._ahead = self._ahead, []
        for stream, last_event_id in ahead:
            self._clock.callLater(self._grace, self._settle_ahead, stream, last_event_id)

    def new_stream(self, previous_offset: int | None) -> None:
        """The queue is a new stream: forget the old one and reset every open stream, so
        that each gets the new stream's events from its first one.

        The ``reset`` event's id is -1, "before offset 0": a browser that reconnects with
        it is replayed the new stream from its start (no event lost), with no second
        ``reset`` (the window covers from offset 0).
        """
        self.tail = None
        self.is_caught_up = False
        self._held.clear()
        self._ahead.clear()
        self._window.clear()
        frame = reset_frame(self._text_id(previous_offset), 0, self._partition)
        users = _users_of(self._partition)
        for stream in self._registry:
            if users is not None and not users(stream.userid):
                continue  # another partition's: its stream is not the one re-created
            stream.resume_after = -1
            stream.coverage_unknown = False
            stream.write(frame)
        self._registry.take_uncovered(users)

    def _wait_for(self, stream: EventStream, last_event_id: str) -> None:
        if self.is_caught_up:
            self._clock.callLater(self._grace, self._settle_ahead, stream, last_event_id)
        else:
            # The read-back may well pass the id: count the grace from its end.
            self._ahead.append((stream, last_event_id))

    def _settle_ahead(self, stream: EventStream, last_event_id: str) -> None:
        newest = self._window.newest
        if not stream.is_open or stream.resume_after <= (-1 if newest is None else newest):
            return  # closed, or the consumer passed the id (or a new stream reset it)
        self.log.info(
            "Last-Event-ID {last_event_id} of {userid} is past the newest offset consumed "
            "({newest}) after {grace} seconds: reset, live events from here",
            last_event_id=last_event_id,
            userid=stream.userid,
            newest=newest,
            grace=self._grace,
            correlation_id=stream.correlation_id,
        )
        stream.resume_after = -1 if newest is None else newest
        stream.write(
            reset_frame(last_event_id, None if newest is None else newest + 1, self._partition)
        )
