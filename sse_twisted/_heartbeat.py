"""Keep-alive comments on every open stream, spread over the heartbeat interval.

Writing to every stream at once holds the reactor for the whole sweep, and the events
arriving meanwhile wait behind it (measured: p99 latency 78 ms at 1,000 streams against
35-40 ms spread). Each round (one interval) writes to a snapshot of the streams in slices
instead, and a slice larger than L{_BATCH} streams (above 1,500 streams) is written a batch
per reactor turn, so that what arrived meanwhile goes first.

Each slice is a timer, so a reactor wake-up: a round has no more slices than it has
batches of streams (one for up to L{_BATCH} streams, at most L{_SLICES}), and an instance
with few streams wakes once an interval for them, not L{_SLICES} times.
"""

from __future__ import annotations

import math
from collections import deque

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ._framing import comment_frame
from ._streams import EventStream, StreamRegistry

__all__ = ["HeartbeatService"]

_HEARTBEAT = comment_frame("keep-alive")
_SLICES = 150
# About half a millisecond of TLS writes: what an event arriving meanwhile may wait.
_BATCH = 10
# Float sums of slice lengths fall a hair short of the time they add up to.
_EPSILON = 1e-9


class HeartbeatService(Service):
    """Every stream gets one keep-alive comment per ``interval_seconds``, in slices.

    @ivar keep_alives_written: the running total, for the stall log line.
    """

    def __init__(
        self, registry: StreamRegistry, interval_seconds: float, clock: IReactorTime
    ) -> None:
        self._registry = registry
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._unwritten: deque[EventStream] = deque()
        self._next_batch: IDelayedCall | None = None
        self._next_slice: IDelayedCall | None = None
        self._round: list[EventStream] = []
        self._round_started_at = 0.0
        self._slices = 1
        self._slices_taken = 0
        self.keep_alives_written = 0

    def startService(self) -> None:
        """Start the first round; its first slice is written at once."""
        super().startService()
        self._start_round(self._clock.seconds())

    def stopService(self) -> Deferred[None] | None:
        """Stop the rounds."""
        super().stopService()
        for call in (self._next_slice, self._next_batch):
            if call is not None and call.active():
                call.cancel()
        self._next_slice = self._next_batch = None
        self._unwritten.clear()
        self._round = []
        return None

    def _start_round(self, started_at: float) -> None:
        self._round = list(self._registry)
        self._slices = max(1, min(_SLICES, math.ceil(len(self._round) / _BATCH)))
        self._round_started_at = started_at
        self._slices_taken = 0
        self._take_due_slices()

    def _take_due_slices(self) -> None:
        """Queue every slice whose time has come (those a busy reactor ran late are made up,
        so every stream still gets its heartbeat within the interval), then wait for the
        next slice, or the next round."""
        self._next_slice = None
        now = self._clock.seconds()
        slice_seconds = self._interval_seconds / self._slices
        elapsed = now - self._round_started_at
        due = min(self._slices, math.floor(elapsed / slice_seconds + _EPSILON) + 1)
        size = len(self._round)
        first, last = self._slices_taken * size // self._slices, due * size // self._slices
        self._unwritten.extend(self._round[first:last])
        self._slices_taken = due
        if self._next_batch is None:
            self._write_batch()
        if due < self._slices:
            self._next_slice = self._clock.callLater(
                due * slice_seconds - elapsed, self._take_due_slices
            )
            return
        self._round = []
        # A reactor so late that a whole round went by starts the next one now.
        next_round_at = max(now, self._round_started_at + self._interval_seconds)
        self._next_slice = self._clock.callLater(
            next_round_at - now, self._start_round, next_round_at
        )

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
