"""From a RabbitMQ delivery to the streams of its user, through the replay window."""

from __future__ import annotations

from twisted.logger import Logger

from ._framing import event_frame
from ._live import settle_uncovered
from ._messages import InvalidMessage, find_userid, parse_message
from ._metrics import Metrics
from ._replay import ReplayWindow
from ._streams import StreamRegistry

__all__ = ["MessageRouter"]

_PREVIEW_CHARACTERS = 200


class MessageRouter:
    """Validate each message, keep it for replay and write it to its user's open streams.

    The event frame is encoded once per message and the same bytes go to every stream.
    Every instance reads every message, most of them for users with no stream here: when
    L{find_userid} can read such a message's user without parsing it, it is kept for
    replay as it came, and validated (refused with a log line, as any other) and encoded
    only if a replay needs it.
    """

    log = Logger()

    def __init__(
        self,
        registry: StreamRegistry,
        window: ReplayWindow,
        max_message_bytes: int,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._registry = registry
        self._window = window
        self._partition = window.partition
        self._event_id = window.partition.event_id
        self._max_message_bytes = max_message_bytes
        window.decode = self._decode

    def __call__(self, body: bytes, offset: int) -> int:
        """Route the message at stream ``offset``; log and skip it when it is invalid.

        Returns how many streams it was written to.
        """
        if self._window.covered_from is None:
            self._window.consumed(offset)
            # Streams that resumed before anything was consumed: the first offset read
            # tells whether events between theirs and it are lost to this process.
            settle_uncovered(self._registry, offset, self._partition)
        if len(body) > self._max_message_bytes:
            self._window.consumed(offset)
            self._skip(
                body,
                offset,
                f"{len(body)} bytes is over the limit of {self._max_message_bytes}",
                "too_large",
            )
        else:
            userid = find_userid(body)
            if (
                userid is not None
                and not self._registry.streams_of(userid)
                and self._partition.holds(userid)
            ):
                self._window.record_unread(userid, offset, body)
                return 0
            try:
                message = parse_message(body)
            except InvalidMessage as error:
                self._window.consumed(offset)
                self._skip(body, offset, str(error), error.reason)
            else:
                if self._partition.count > 1 and not self._partition.holds(message.userid):
                    # Its user's streams count this partition's offsets: it would be the
                    # wrong position for them, and it is not what they resume from.
                    self._skip(
                        body,
                        offset,
                        f"user {message.userid} lives in another partition than "
                        f"{self._partition.number} (published with the wrong routing key)",
                        "wrong_partition",
                    )
                    return 0
                frame = event_frame(message.data, self._event_id(offset))
                self._window.record(message.userid, message.topic, offset, frame)
                return self._registry.deliver(message.userid, message.topic, offset, frame)
        return 0

    def _decode(self, body: bytes, offset: int) -> tuple[str | None, bytes] | None:
        """The topic and frame of a message kept unread, or None (logged) if it is invalid."""
        try:
            message = parse_message(body)
        except InvalidMessage as error:
            self._skip(body, offset, str(error), error.reason)
            return None
        return message.topic, event_frame(message.data, self._event_id(offset))

    def _skip(self, body: bytes, offset: int, reason: str, kind: str) -> None:
        self._metrics.skipped(kind)
        self.log.warn(
            "skipped message at offset {offset}: {reason}",
            offset=offset,
            reason=reason,
            size=len(body),
            preview=body[:_PREVIEW_CHARACTERS].decode("utf-8", "replace"),
        )
