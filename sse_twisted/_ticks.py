"""One grid for the server's periodic timers: timers due at the same instant share one
reactor wake-up.

An instance with messages trickling in, a stall tick and acknowledgements to send would
otherwise wake for each of them apart; on a busy host a wake-up costs several messages'
worth of CPU (bench/RESULTS.md, issue 13).
"""

from __future__ import annotations

__all__ = ["TICK_SECONDS", "delay_to_tick", "delay_to_tick_by"]

TICK_SECONDS = 0.05
"""The grid's step: the stall monitor's tick; other periodic timers fall on its points."""

# The grid is counted in whole nanoseconds: exact whatever the clock reads (an epoch time
# divided by 0.05 in floating point is off by more than a hair of a step).
_NANOSECONDS = 1_000_000_000


def delay_to_tick(now: float, period: float = TICK_SECONDS) -> float:
    """Seconds from ``now`` to the next multiple of ``period`` on the reactor's clock,
    always later than ``now`` (a timer running on a grid point is given the next one).

    Timers whose periods are multiples of one another meet on the points they share.
    """
    now_ns = round(now * _NANOSECONDS)
    step_ns = round(period * _NANOSECONDS)
    point_ns = (now_ns // step_ns + 1) * step_ns
    return (point_ns - now_ns) / _NANOSECONDS


def delay_to_tick_by(now: float, seconds: float) -> float:
    """Seconds from ``now`` to the last point of the grid at most ``seconds`` away, for a
    timer that must fire within ``seconds`` (at least one step)."""
    early = seconds - TICK_SECONDS
    return early + delay_to_tick(now + early)
