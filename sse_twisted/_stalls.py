"""Stalls made visible: how late the reactor runs a short periodic tick, how long each
garbage collection holds the process, and one log line per stall saying what ran.

A tick is due at every point of the tick grid (L{sse_twisted._ticks.TICK_SECONDS}
apart); the time it runs past that is the reactor's lag, the time everything else waiting
for the reactor (a message to deliver, a connection to accept) waited too. A stall
blocks at most one tick, so the lag seen is between the stall's length minus one interval
and its length.

What ran is told by counters the components already keep (``activity``): each stall line
gives how much each moved since the previous tick, beside the collections that ran in
between and the CPU time the process used. A stall with little CPU time is the host's
(the process was not scheduled, or waited in a system call), not work of ours; on a
shared host that happens, so the line is ``info``, not a warning: the histogram is what
to alert on.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ._ticks import delay_to_tick

__all__ = ["CollectionPause", "GarbageCollectionTimer", "StallMonitorService"]


@dataclass(frozen=True, slots=True)
class CollectionPause:
    """One garbage collection: the oldest generation it collected, how long it took."""

    generation: int
    seconds: float
    collected: int


class GarbageCollectionTimer:
    """Times every collection with C{gc.callbacks}: into the histogram of its generation,
    and kept until L{take} for the stall line.

    Collections may run on any thread (whichever allocates); the GIL is held throughout,
    so the reactor waits for them all the same.
    """

    def __init__(
        self,
        pauses_by_generation: Mapping[int, Histogram],
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._histograms = pauses_by_generation
        self._timer = timer
        self._started_at: float | None = None
        self._pauses: list[CollectionPause] = []

    def install(self) -> None:
        """Start timing collections (once, however often called)."""
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        """Stop timing collections."""
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """The C{gc.callbacks} callback: ``phase`` is C{"start"} or C{"stop"}."""
        if phase == "start":
            self._started_at = self._timer()
            return
        started_at, self._started_at = self._started_at, None
        if started_at is None:
            return  # installed during this collection: its start was not seen
        seconds = self._timer() - started_at
        generation = info["generation"]
        self._histograms[generation].observe(seconds)
        self._pauses.append(CollectionPause(generation, seconds, info["collected"]))

    def take(self) -> list[CollectionPause]:
        """The collections timed since the previous call."""
        pauses, self._pauses = self._pauses, []
        return pauses


class StallMonitorService(Service):
    """Measures the reactor's lag at every tick; logs a line for each over ``log_seconds``.

    ``activity`` names counters (each a function returning a running total) whose
    increase since the previous tick the stall line reports, under the same names.
    ``gauges`` are reported as they are at the stall (e.g. open streams).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        lag_histogram: Histogram,
        collections: GarbageCollectionTimer,
        log_seconds: float,
        activity: Mapping[str, Callable[[], float]],
        gauges: Mapping[str, Callable[[], float]],
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._cpu_at_tick = 0.0
        self._lag = lag_histogram
        self._collections = collections
        self._log_seconds = log_seconds
        self._activity = activity
        self._gauges = gauges
        self._totals: dict[str, float] = {}
        self._due = 0.0
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        """Time collections now; tick once the reactor runs (start-up is no stall)."""
        super().startService()
        self._collections.install()
        self._call = self._clock.callLater(0, self._start_ticking)

    def stopService(self) -> Deferred[None] | None:
        """Stop ticking and timing collections."""
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._collections.uninstall()
        return None

    def _start_ticking(self) -> None:
        self._collections.take()
        self._totals = self._read_totals()
        self._schedule()

    def _read_totals(self) -> dict[str, float]:
        self._cpu_at_tick = self._cpu_clock()
        return {name: total() for name, total in self._activity.items()}

    def _schedule(self) -> None:
        # On the tick grid, where paced reads and acks fall too: one wake-up for them all.
        now = self._clock.seconds()
        delay = delay_to_tick(now)
        self._due = now + delay
        self._call = self._clock.callLater(delay, self._tick)

    def _tick(self) -> None:
        lag = max(0.0, self._clock.seconds() - self._due)
        self._lag.observe(lag)
        pauses = self._collections.take()
        previous, cpu_at_previous = self._totals, self._cpu_at_tick
        self._totals = self._read_totals()
        if self._log_seconds and lag >= self._log_seconds:
            self._log_stall(lag, self._cpu_at_tick - cpu_at_previous, pauses, previous)
        self._schedule()

    def _log_stall(
        self,
        lag: float,
        cpu_seconds: float,
        pauses: list[CollectionPause],
        previous: Mapping[str, float],
    ) -> None:
        fields = {name: int(self._totals[name] - previous[name]) for name in self._totals}
        fields.update({name: int(gauge()) for name, gauge in self._gauges.items()})
        self.log.info(
            "reactor stalled: a tick ran {lag_ms} ms late ({gc_ms} ms of garbage collection)",
            lag_ms=round(lag * 1000, 1),
            cpu_ms=round(cpu_seconds * 1000, 1),
            gc_collections=len(pauses),
            gc_ms=round(sum(pause.seconds for pause in pauses) * 1000, 1),
            gc_generation=max((pause.generation for pause in pauses), default=None),
            gc_collected=sum(pause.collected for pause in pauses),
            **fields,
        )
