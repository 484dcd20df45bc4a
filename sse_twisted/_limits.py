"""Open files: raise the soft limit at start-up, and say so when descriptors run short.

Each stream holds one socket, so the open-file limit caps the streams a process can hold.
Shells and systemd start services with a soft limit of 1,024 and a much higher hard limit;
like the Go runtime, the server raises its soft limit to the hard limit by itself.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogPublisher, globalLogPublisher
from zope.interface import implementer

__all__ = [
    "OWN_DESCRIPTORS",
    "DescriptorShortageWarnings",
    "OpenFileLimit",
    "raise_open_file_limit",
    "warn_if_limit_below_streams",
]

# Descriptors the server holds besides its streams: listening ports, log files, the
# database and broker connections, TLS reloads, Twisted's wakers and EMFILE reserve.
OWN_DESCRIPTORS = 64

_log = Logger(namespace="sse_twisted.startup")


@dataclass(frozen=True)
class OpenFileLimit:
    """The soft open-file limit before and after start-up raised it, and the hard limit."""

    before: int
    soft: int
    hard: int


def raise_open_file_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> OpenFileLimit:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; keep it where it is if refused.

    An unlimited hard limit is not a value Linux takes for the soft limit (it is capped by
    ``fs.nr_open``): the soft limit then stays, and the caller's warning names it.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return OpenFileLimit(soft, soft, hard)
    try:
        setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as error:
        _log.warn(
            "cannot raise the open-file limit from {soft} to {hard}: {error}",
            soft=soft,
            hard=hard,
            error=str(error),
        )
        return OpenFileLimit(soft, soft, hard)
    return OpenFileLimit(soft, hard, hard)


def warn_if_limit_below_streams(limit: OpenFileLimit, max_streams: int) -> bool:
    """Log one warning when ``limit`` cannot hold ``max_streams`` plus the server's own
    descriptors; return whether it did."""
    needed = max_streams + OWN_DESCRIPTORS
    if limit.soft == resource.RLIM_INFINITY or limit.soft >= needed:
        _log.info(
            "open-file limit {limit} (was {before}) holds SSE_MAX_STREAMS={max_streams}",
            limit=limit.soft,
            before=limit.before,
            max_streams=max_streams,
        )
        return False
    _log.warn(
        "open-file limit {limit} cannot hold SSE_MAX_STREAMS={max_streams} plus {own} "
        "descriptors of the server's own: past about {streams} streams new connections are "
        "closed unanswered instead of refused with 429. Raise the hard limit to {needed} "
        "(LimitNOFILE={needed} in the systemd unit, ulimits: nofile: {needed} in compose) "
        "or lower SSE_MAX_STREAMS to {streams}",
        limit=limit.soft,
        max_streams=max_streams,
        own=OWN_DESCRIPTORS,
        streams=max(limit.soft - OWN_DESCRIPTORS, 0),
        needed=needed,
    )
    return True


# Twisted's tcp.Port logs each connection it had to close because accept() hit EMFILE with
# this format, at info level (checked with Twisted 26.10); tests/test_open_files.py
# fails clearly if it changes.
EMFILE_CLOSED_FORMAT = "EMFILE recovery: Closed socket from {address}"


@implementer(ILogObserver)
class DescriptorShortageWarnings(Service):
    """One warning per burst of connections closed unanswered for want of a descriptor.

    The warning comes once no such connection has been closed for ``quiet_seconds`` (or
    ``longest_seconds`` into a burst that does not stop), with the count.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        limit: Callable[[], int],
        quiet_seconds: float = 1.0,
        longest_seconds: float = 10.0,
        publisher: LogPublisher = globalLogPublisher,
    ) -> None:
        self._clock = clock
        self._limit = limit
        self._quiet_seconds = quiet_seconds
        self._longest_seconds = longest_seconds
        self._publisher = publisher
        self._closed = 0
        self._started = 0.0
        self._pending: IDelayedCall | None = None

    def startService(self) -> None:
        """Watch the log for Twisted's EMFILE recovery."""
        super().startService()
        self._publisher.addObserver(self)

    def stopService(self) -> None:
        """Stop watching; a burst in progress is reported now."""
        super().stopService()
        self._publisher.removeObserver(self)
        if self._pending is not None:
            self._pending.cancel()
            self._report()

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_format") != EMFILE_CLOSED_FORMAT:
            return
        now = self._clock.seconds()
        if self._closed == 0:
            self._started = now
        self._closed += 1
        if self._pending is not None:
            self._pending.cancel()
        delay = min(self._quiet_seconds, self._started + self._longest_seconds - now)
        self._pending = self._clock.callLater(max(delay, 0), self._report)

    def _report(self) -> None:
        self._pending = None
        closed, self._closed = self._closed, 0
        self.log.warn(
            "out of file descriptors: closed {count} new connections unanswered "
            "(open-file limit {limit})",
            count=closed,
            limit=self._limit(),
        )
