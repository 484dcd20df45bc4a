"""An event-stream parser written from the WHATWG "Server-sent events" processing model.

Tests use it to read what the server wrote the way a browser would.
"""

from __future__ import annotations

import codecs


class EventParser:
    """Feed bytes, get the events a browser's EventSource would dispatch."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._data: list[str] = []
        self._event = ""
        self.last_event_id = ""
        self.retry: int | None = None
        self.comments: list[str] = []

    def feed(self, chunk: bytes) -> list[dict[str, str]]:
        """Consume ``chunk``; return the events it completed, in order."""
        text = self._pending + self._decoder.decode(chunk)
        events: list[dict[str, str]] = []
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        # A trailing CR may be the first half of a CRLF split across chunks.
        self._pending = lines.pop()
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> dict[str, str] | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            self.comments.append(line[1:].lstrip(" "))
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None

    def _dispatch(self) -> dict[str, str] | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return {"event": event or "message", "id": self.last_event_id, "data": "\n".join(data)}
