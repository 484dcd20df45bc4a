"""Server-Sent Events wire format (WHATWG HTML, "Server-sent events")."""

from __future__ import annotations

import random
import re

__all__ = ["comment_frame", "event_frame", "id_frame", "jittered_retry_frame", "retry_frame"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


def event_frame(data: bytes, event_id: int | str | None = None, event: str | None = None) -> bytes:
    """One event: optional ``event:`` and ``id:`` lines, then one ``data:`` line per line of data.

    Line breaks inside ``data`` become separate ``data:`` lines, which the browser joins
    back with ``\\n``: no content can end the event early or add a field.
    """
    head = b""
    if event is not None:
        head += b"event: " + _one_line(event.encode("utf-8")) + b"\n"
    if event_id is not None:
        head += _id_line(event_id)
    if b"\n" in data or b"\r" in data:
        body = b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(data))
    else:
        body = b"data: " + data + b"\n"
    return head + body + b"\n"


def comment_frame(text: str) -> bytes:
    """A comment line: ignored by the browser, it keeps proxies and idle timers from closing."""
    return b": " + _one_line(text.encode("utf-8")) + b"\n\n"


def id_frame(event_id: int | str) -> bytes:
    """Move the browser's last event id to ``event_id`` without dispatching an event."""
    return _id_line(event_id) + b"\n"


def _id_line(event_id: int | str) -> bytes:
    # An offset, or a partition's id (``4-2-1187``, ASCII by construction).
    if isinstance(event_id, int):
        return b"id: %d\n" % event_id
    return b"id: " + event_id.encode("ascii") + b"\n"


def retry_frame(milliseconds: int) -> bytes:
    """Set the browser's reconnection delay."""
    return b"retry: %d\n\n" % milliseconds


def jittered_retry_frame(milliseconds: int, jitter_milliseconds: int) -> bytes:
    """A reconnection delay of ``milliseconds`` plus up to ``jitter_milliseconds`` drawn at
    random, so that thousands of browsers closed together do not all come back in the
    same millisecond."""
    return retry_frame(milliseconds + random.randint(0, jitter_milliseconds))


def _one_line(text: bytes) -> bytes:
    return _LINE_BREAK.sub(b" ", text)
