"""Reading what the code under test logged: the events the ``log_events`` fixture
(tests/conftest.py) captures with L{twisted.logger.capturedLogs}, and the JSON lines
the production observer writes."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from sse_twisted._logging import JSONLogObserver

__all__ = [
    "failures",
    "json_log",
    "lines_with",
    "log_text",
    "tracebacks",
    "warnings_logged",
]


def log_text(events: Sequence[LogEvent]) -> str:
    """Every event, formatted and with all its fields, one per line."""
    return "\n".join(f"{formatEvent(event)} {event!r}" for event in events)


def lines_with(events: Sequence[LogEvent], text: str) -> list[str]:
    """The formatted events containing ``text``."""
    return [line for line in map(formatEvent, events) if text in line]


def warnings_logged(events: Sequence[LogEvent]) -> list[str]:
    """The formatted warnings."""
    return [formatEvent(event) for event in events if event["log_level"] == LogLevel.warn]


def tracebacks(events: Sequence[LogEvent]) -> list[str]:
    """Events carrying a failure: unhandled errors, including collected failed Deferreds."""
    gc.collect()  # "Unhandled error in Deferred" is logged when the Deferred is collected
    return [
        formatEvent(event)
        for event in events
        if "log_failure" in event or "failure" in event or event.get("isError")
    ]


def failures(events: Sequence[LogEvent]) -> list[str]:
    """The events that report an error: failures, unhandled errors, error and critical lines."""
    gc.collect()  # "Unhandled error in Deferred" is logged when the Deferred is collected
    return [
        formatEvent(event)
        for event in events
        if "log_failure" in event
        or event.get("isError")
        or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """What the JSON observer writes of every event logged meanwhile."""
    written = io.StringIO()
    observer = JSONLogObserver("test", "sse", None, stream=written)
    globalLogPublisher.addObserver(observer)
    try:
        yield written
    finally:
        globalLogPublisher.removeObserver(observer)
