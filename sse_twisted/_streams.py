"""Open event streams, indexed by user and topic so that routing a message never scans."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from twisted.web.server import Request

from ._framing import event_frame
from ._messages import Message

__all__ = ["EventStream", "StreamRegistry"]


@dataclass(eq=False, slots=True)
class EventStream:
    """One browser subscription: a held-open request for one user and topic."""

    userid: str
    topic: str
    request: Request = field(repr=False)
    correlation_id: str

    def write(self, frame: bytes) -> None:
        """Queue bytes on the connection; the transport writes them without blocking."""
        self.request.write(frame)

    def close(self) -> None:
        """End the response; the browser reconnects after its retry delay."""
        if not self.request.finished:
            self.request.finish()


class StreamRegistry:
    """The open streams of this process, by userid then topic."""

    def __init__(self) -> None:
        self._by_user: dict[str, dict[str, set[EventStream]]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, stream: EventStream) -> None:
        """Start routing the user's messages to ``stream``."""
        topics = self._by_user.setdefault(stream.userid, {})
        topics.setdefault(stream.topic, set()).add(stream)
        self._count += 1

    def remove(self, stream: EventStream) -> None:
        """Stop routing to ``stream``; removing an unknown stream does nothing."""
        topics = self._by_user.get(stream.userid)
        if topics is None:
            return
        streams = topics.get(stream.topic)
        if streams is None or stream not in streams:
            return
        streams.discard(stream)
        self._count -= 1
        if not streams:
            del topics[stream.topic]
            if not topics:
                del self._by_user[stream.userid]

    def streams_of(self, userid: str, topic: str | None = None) -> Iterator[EventStream]:
        """The user's streams, only those on ``topic`` when it is given."""
        topics = self._by_user.get(userid)
        if topics is None:
            return
        if topic is not None:
            yield from tuple(topics.get(topic, ()))
            return
        for streams in tuple(topics.values()):
            yield from tuple(streams)

    def __iter__(self) -> Iterator[EventStream]:
        for topics in tuple(self._by_user.values()):
            for streams in tuple(topics.values()):
                yield from tuple(streams)

    def deliver(self, message: Message, offset: int) -> int:
        """Write ``message`` as event ``offset`` to each of its streams; return how many."""
        frame = event_frame(message.data, offset)
        delivered = 0
        for stream in self.streams_of(message.userid, message.topic):
            stream.write(frame)
            delivered += 1
        return delivered
