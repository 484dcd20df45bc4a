"""Admission under load: subscriber checks in flight per client address, and refusals
logged as a summary instead of a line each (a flood would otherwise flood the log)."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

__all__ = ["ChecksPerClient", "RefusalLog"]


class ChecksPerClient:
    """Counts the subscriber checks in flight for each client address, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._in_flight: dict[str, int] = {}

    def __len__(self) -> int:
        """How many addresses have a check in flight."""
        return len(self._in_flight)

    def take(self, client: str) -> bool:
        """Count one more check for ``client``; False (and nothing counted) at the limit."""
        count = self._in_flight.get(client, 0)
        if count >= self._limit:
            return False
        self._in_flight[client] = count + 1
        return True

    def give_back(self, client: str) -> None:
        """One check of ``client`` is over, whatever its outcome."""
        count = self._in_flight[client] - 1
        if count:
            self._in_flight[client] = count
        else:
            del self._in_flight[client]


class RefusalLog:
    """One warning per kind of refusal at most every ``interval_seconds``, saying how many
    there were since the previous one (the metrics count every refusal as it happens)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, interval_seconds: float = 10.0) -> None:
        self._clock = clock
        self._interval_seconds = interval_seconds
        self._unlogged: dict[str, int] = {}
        self._next_line_at: dict[str, float] = {}

    def refused(self, kind: str, reason: str, client: str, correlation_id: str | None) -> None:
        """Note one refused subscribe; log the summary line when one is due."""
        count = self._unlogged.get(kind, 0) + 1
        now = self._clock.seconds()
        if now < self._next_line_at.get(kind, now):
            self._unlogged[kind] = count
            return
        self._unlogged[kind] = 0
        self._next_line_at[kind] = now + self._interval_seconds
        self.log.warn(
            "refused {count} subscribes ({kind}) since the last such line, asked them to "
            "come back later: {reason}",
            count=count,
            kind=kind,
            reason=reason,
            client=client,
            correlation_id=correlation_id,
        )
