"""Keep-alive comments on every open stream, spread over the heartbeat interval.

Writing to every stream at once holds the reactor for the whole sweep, and the events
arriving meanwhile wait behind it (measured: p99 latency 78 ms at 1,000 streams against
35-40 ms spread). Each tick writes to the next slice of a snapshot instead, and a slice
larger than L{_BATCH} streams (above 1,500 streams) is written a batch per reactor turn,
so that what arrived meanwhile goes first.
"""

from __future__ import annotations

from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall

from ._framing import comment_frame
from ._streams import EventStream, StreamRegistry

__all__ = ["HeartbeatService"]

_HEARTBEAT = comment_frame("keep-alive")
_SLICES = 150
# About half a millisecond of TLS writes: what an event arriving meanwhile may wait.
_BATCH = 10


class HeartbeatService(Service):
    """Every stream gets one keep-alive comment per ``interval_seconds``, in slices.

    @ivar keep_alives_written: the running total, for the stall log line.
    """

    def __init__(
        self, registry: StreamRegistry, interval_seconds: float, clock: IReactorTime
    ) -> None:
        self._registry = registry
        self._tick_seconds = interval_seconds / _SLICES
        # withCount: ticks a busy reactor ran late are made up, not skipped, so every
        # stream still gets its heartbeat within the interval.
        self._loop = LoopingCall.withCount(self._tick)
        self._loop.clock = clock
        self._clock = clock
        self._unwritten: deque[EventStream] = deque()
        self._next_batch: IDelayedCall | None = None
        self._round: list[EventStream] = []
        self._position = 0
        self.keep_alives_written = 0

    def startService(self) -> None:
        """Start the ticks; the first slice is written at once."""
        super().startService()
        self._loop.start(self._tick_seconds, now=True)

    def stopService(self) -> Deferred[None] | None:
        """Stop the ticks."""
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._next_batch is not None and self._next_batch.active():
            self._next_batch.cancel()
        self._next_batch = None
        self._unwritten.clear()
        return None

    def _tick(self, ticks: int) -> None:
        for _ in range(ticks):
            if self._position == 0:
                self._round = list(self._registry)
            # Tick k of a round writes to the k-th of _SLICES equal parts of its snapshot.
            size = len(self._round)
            start = self._position * size // _SLICES
            self._position += 1
            self._unwritten.extend(self._round[start : self._position * size // _SLICES])
            if self._position == _SLICES:
                self._position = 0
                self._round = []
        if self._next_batch is None:
            self._write_batch()

    def _write_batch(self) -> None:
        self._next_batch = None
        unwritten = self._unwritten
        for _ in range(min(_BATCH, len(unwritten))):
            stream = unwritten.popleft()
            # The snapshot may hold streams that closed since it was taken.
            if stream.is_open:
                stream.keep_alive(_HEARTBEAT)
                self.keep_alives_written += 1
        if unwritten:
            self._next_batch = self._clock.callLater(0, self._write_batch)
