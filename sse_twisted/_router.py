"""From a RabbitMQ delivery to the streams of its user."""

from __future__ import annotations

from twisted.logger import Logger

from ._messages import InvalidMessage, parse_message
from ._streams import StreamRegistry

__all__ = ["MessageRouter"]

_PREVIEW_CHARACTERS = 200


class MessageRouter:
    """Validate each message and write it to every open stream of its user (and topic)."""

    log = Logger()

    def __init__(self, registry: StreamRegistry, max_message_bytes: int) -> None:
        self._registry = registry
        self._max_message_bytes = max_message_bytes

    def __call__(self, body: bytes, offset: int) -> None:
        """Route the message at stream ``offset``; log and skip it when it is invalid."""
        if len(body) > self._max_message_bytes:
            self._skip(
                body, offset, f"{len(body)} bytes is over the limit of {self._max_message_bytes}"
            )
            return
        try:
            message = parse_message(body)
        except InvalidMessage as error:
            self._skip(body, offset, str(error))
            return
        self._registry.deliver(message, offset)

    def _skip(self, body: bytes, offset: int, reason: str) -> None:
        self.log.warn(
            "skipped message at offset {offset}: {reason}",
            offset=offset,
            reason=reason,
            size=len(body),
            preview=body[:_PREVIEW_CHARACTERS].decode("utf-8", "replace"),
        )
