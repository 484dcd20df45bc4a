"""JSON log lines for Logstash/Filebeat: to stdout and to a daily file.

Every line is one JSON object with ``@timestamp``, ``@level``, ``message``, ``env``,
``index``, ``correlation_id`` (when the event belongs to a request) and the event's own
keyword fields.  Secrets are kept out twice: code never logs them, and this observer
masks, in every string value of a line, configured secret values and the token segment of
subscribe paths.

A configured secret is masked in the forms an error message may quote it in: as is,
JSON-escaped, repr-escaped and percent-encoded, in any case.  A word-like secret (letters
only, or under 8 characters, such as C{guest}) is masked only where it stands as a
credential (after C{password=}, C{"password": "}, or in a URL's C{user:secret@}): masked
everywhere, it would mask that ordinary word in every line and so show what the secret is.
Fields named like a secret (C{password}, C{token}, ...) are masked whatever they hold.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.logfile import DailyLogFile
from zope.interface import implementer

from ._paths import MASK

__all__ = ["JSONLogObserver", "bridge_standard_logging", "mask_subscribe_path"]

# The nonce is the last segment of /subscribe/<topic>/<userid>/<nonce>.
_SUBSCRIBE_TOKEN = re.compile(r"(/subscribe/[^/\s\"?]*/[^/\s\"?]*/)[^\s\"?&]+")
# Fields whose value is a secret, whatever it is.
_SECRET_FIELDS = frozenset({"password", "token", "nonce", "secret", "authorization"})
# Where a word-like secret stands as a credential: a password key (a DSN, a JSON or Python
# dict) or the password of a URL's user information.
_CREDENTIAL_LEAD = r"""(?:pass(?:word)?|pwd)['"]?\s*[=:]\s*['"]?|://[^/\s:@]*:"""
_DELIMITER = r"""(?=[\s'"@&;,)}\]]|$)"""
_WORD_LIKE_LENGTH = 8
# Keys of twisted.python.log events that the fields above already carry.
_LEGACY_KEYS = frozenset({"format", "message", "time", "isError", "failure", "why", "system"})


def mask_subscribe_path(text: str) -> str:
    """Replace the token segment of any subscribe path in ``text``."""
    if "/subscribe/" not in text:
        return text
    return _SUBSCRIBE_TOKEN.sub(r"\1" + MASK, text)


def _spellings(secret: str) -> set[str]:
    """The forms ``secret`` takes in error messages, JSON and URLs."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        quote(secret, safe=""),
    }


def _alternatives(spellings: Iterable[str]) -> str:
    # Longest first, so that a spelling is not masked only in part.
    return "|".join(map(re.escape, sorted(spellings, key=len, reverse=True)))


def _secret_masker(secrets: Iterable[str]) -> Callable[[str], str]:
    """A function that masks ``secrets`` in a string (see the module docstring)."""
    anywhere: set[str] = set()
    as_credential: set[str] = set()
    for secret in filter(None, secrets):
        word_like = len(secret) < _WORD_LIKE_LENGTH or secret.isalpha()
        (as_credential if word_like else anywhere).update(_spellings(secret))
    patterns = []
    if anywhere:
        patterns.append(_alternatives(anywhere))
    if as_credential:
        patterns.append(
            f"(?P<lead>{_CREDENTIAL_LEAD})(?:{_alternatives(as_credential)}){_DELIMITER}"
        )
    if not patterns:
        return mask_subscribe_path
    pattern = re.compile("|".join(patterns), re.IGNORECASE)
    # Access lines are on the hot path: a few substring tests spare most strings the regex.
    lowered = tuple({spelling.lower() for spelling in anywhere | as_credential})

    def replace(match: re.Match[str]) -> str:
        lead = match.groupdict().get("lead")
        return MASK if lead is None else lead + MASK

    def mask(text: str) -> str:
        lowered_text = text.lower()
        for spelling in lowered:
            if spelling in lowered_text:
                text = pattern.sub(replace, text)
                break
        return mask_subscribe_path(text)

    return mask


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
    """Write each log event as one JSON line to stdout and, if given, a daily log file.

    @ivar lines_written: the running total of lines (and C{bytes_written} of characters),
        for the stall log line.
    """

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
        self._mask = _secret_masker(secrets)
        self._file: DailyLogFile | None = None
        if logs_dir is not None:
            logs_dir.mkdir(parents=True, exist_ok=True)
            self._file = DailyLogFile(f"{index}.log", str(logs_dir))
        self.lines_written = 0
        self.bytes_written = 0

    def __call__(self, event: LogEvent) -> None:
        line = self.format(event) + "\n"
        self.lines_written += 1
        self.bytes_written += len(line)
        self._stream.write(line)
        self._stream.flush()
        if self._file is not None:
            self._file.write(line)
            self._file.flush()

    def format(self, event: LogEvent) -> str:
        """The JSON line for ``event``, with secrets masked."""
        level = event.get("log_level")
        secret_fields = [key for key in event if key.lower() in _SECRET_FIELDS]
        if secret_fields:
            # The message is formatted from the fields: mask them before it is.
            event = {**event, **dict.fromkeys(secret_fields, MASK)}
        record: dict[str, Any] = {
            "@timestamp": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "@level": level.name if level is not None else "info",
            "message": self._mask(formatEvent(event)),
            "env": self._env,
            "index": self._index,
            "correlation_id": self._masked(event.get("correlation_id")),
            "logger": event.get("log_namespace"),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = self._mask(failure.getErrorMessage())
            record["traceback"] = self._mask(failure.getTraceback())
        for key, value in event.items():
            if not key.startswith("log_") and key not in record and key not in _LEGACY_KEYS:
                record[key] = self._masked(value)
        return json.dumps(record, ensure_ascii=False)

    def _masked(self, value: Any) -> Any:
        """``value`` as JSON types, with secrets masked in every string in it."""
        if isinstance(value, str):
            return self._mask(value)
        if value is None or isinstance(value, int | float | bool):
            return value
        if isinstance(value, list | tuple):
            return [self._masked(item) for item in value]
        if isinstance(value, dict):
            return {
                str(key): MASK if str(key).lower() in _SECRET_FIELDS else self._masked(item)
                for key, item in value.items()
            }
        return self._mask(str(value))

    def close(self) -> None:
        """Close the log file."""
        if self._file is not None:
            self._file.close()
