"""One grid for the server's periodic timers: timers due at the same instant share one
reactor wake-up.

An instance with messages trickling in, a stall tick and acknowledgements to send would
otherwise wake for each of them apart; on a busy host a wake-up costs several messages'
worth of CPU (bench/RESULTS.md, issue 13).
"""

from __future__ import annotations

import math

__all__ = ["TICK_SECONDS", "delay_to_tick", "delay_to_tick_by"]

TICK_SECONDS = 0.05
"""The grid's step: the stall monitor's tick; other periodic timers fall on its points."""

# A time a hair below a grid point (floating-point rounding of k * period) is on it.
_ON_THE_POINT = 1e-6
# Grid points are whole nanoseconds, so that every timer computes the same float for one.
_DIGITS = 9


def delay_to_tick(now: float, period: float = TICK_SECONDS) -> float:
    """Seconds from ``now`` to the next multiple of ``period`` on the reactor's clock,
    always later than ``now`` (a timer running on a grid point is given the next one).

    Timers whose periods are multiples of one another meet on the points they share.
    """
    point = round((math.floor(now / period + _ON_THE_POINT) + 1) * period, _DIGITS)
    return point - now


def delay_to_tick_by(now: float, seconds: float) -> float:
    """Seconds from ``now`` to the last point of the grid at most ``seconds`` away, for a
    timer that must fire within ``seconds`` (at least one step)."""
    early = seconds - TICK_SECONDS
    return early + delay_to_tick(now + early)
