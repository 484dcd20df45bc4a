"""JSON log lines for Logstash/Filebeat: to stdout and to a daily file.

Every line is one JSON object with ``@timestamp``, ``@level``, ``message``, ``env``,
``index``, ``correlation_id`` (when the event belongs to a request) and the event's own
keyword fields.  Secrets are kept out twice: code never logs them, and this observer
masks configured secret values and the token segment of subscribe paths in every line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.logfile import DailyLogFile
from zope.interface import implementer

__all__ = ["JSONLogObserver", "bridge_standard_logging", "mask_subscribe_path"]

# The nonce is the last segment of /subscribe/<topic>/<userid>/<nonce>.
_SUBSCRIBE_TOKEN = re.compile(r"(/subscribe/[^/\s\"?]*/[^/\s\"?]*/)[^\s\"?&]+")
_MASK = "****"
# Keys of twisted.python.log events that the fields above already carry.
_LEGACY_KEYS = frozenset({"format", "message", "time", "isError", "failure", "why", "system"})


def mask_subscribe_path(text: str) -> str:
    """Replace the token segment of any subscribe path in ``text``."""
    return _SUBSCRIBE_TOKEN.sub(r"\1" + _MASK, text)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return str(value)


class StandardLoggingBridge(logging.Handler):
    """Send records of the standard ``logging`` module (pika's) to the Twisted log."""

    def emit(self, record: logging.LogRecord) -> None:
        """Re-emit ``record`` on a Twisted logger named after its stdlib logger."""
        level = _STANDARD_LEVELS.get(record.levelno, LogLevel.critical)
        Logger(namespace=record.name).emit(level, "{text}", text=record.getMessage())


_STANDARD_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
}


def bridge_standard_logging() -> None:
    """Route warnings and errors of stdlib loggers into the JSON log (once per process)."""
    root = logging.getLogger()
    if not any(isinstance(handler, StandardLoggingBridge) for handler in root.handlers):
        root.addHandler(StandardLoggingBridge(logging.WARNING))


@implementer(ILogObserver)
class JSONLogObserver:
    """Write each log event as one JSON line to stdout and, if given, a daily log file."""

    def __init__(
        self,
        env: str,
        index: str,
        logs_dir: Path | None,
        secrets: Iterable[str] = (),
        stream: IO[str] | None = None,
    ) -> None:
        # twistd redirects sys.stdout into the log once logging begins: keep the real one.
        self._stream = stream if stream is not None else sys.stdout
        self._env = env
        self._index = index
        self._secrets = tuple(secret for secret in secrets if secret)
        self._file: DailyLogFile | None = None
        if logs_dir is not None:
            logs_dir.mkdir(parents=True, exist_ok=True)
            self._file = DailyLogFile(f"{index}.log", str(logs_dir))

    def __call__(self, event: LogEvent) -> None:
        line = self.format(event) + "\n"
        self._stream.write(line)
        self._stream.flush()
        if self._file is not None:
            self._file.write(line)
            self._file.flush()

    def format(self, event: LogEvent) -> str:
        """The JSON line for ``event``, with secrets masked."""
        level = event.get("log_level")
        record: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "@level": level.name if level is not None else "info",
            "message": formatEvent(event),
            "env": self._env,
            "index": self._index,
            "correlation_id": event.get("correlation_id"),
            "logger": event.get("log_namespace"),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = failure.getErrorMessage()
            record["traceback"] = failure.getTraceback()
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and key not in _LEGACY_KEYS:
                record[key] = _jsonable(value)
        line = mask_subscribe_path(json.dumps(record, ensure_ascii=False, default=str))
        for secret in self._secrets:
            line = line.replace(secret, _MASK)
        return line

    def close(self) -> None:
        """Close the log file."""
        if self._file is not None:
            self._file.close()
