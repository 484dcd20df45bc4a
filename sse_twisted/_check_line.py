"""A bounded line of subscriber checks waiting for a free PostgreSQL connection.

txpostgres's pool queues queries without bound, and sends a query whose caller has long
gone. Here a check waits in our own line instead: past ``max_waiting`` it is refused at
once, and a check cancelled while waiting (the browser left, or its wait timed out) leaves
the line and is never sent.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, fail

from .interfaces import BackendBusy

__all__ = ["CheckLine"]

Slot = TypeVar("Slot")


class CheckLine(Generic[Slot]):
    """Waiting checks in arrival order; L{hand_over} gives a free slot to the oldest."""

    def __init__(self, max_waiting: int) -> None:
        self._max_waiting = max_waiting
        # Insertion ordered: first in line first. A dict, so that leaving is O(1).
        self._waiting: OrderedDict[Deferred[Slot], None] = OrderedDict()

    def __len__(self) -> int:
        """How many checks wait."""
        return len(self._waiting)

    def wait(self, first: bool = False) -> Deferred[Slot]:
        """Join the line; fires with the slot handed over, or fails at once with
        L{BackendBusy} when ``max_waiting`` checks wait already.

        ``first`` goes ahead of everyone and is never refused (the readiness probe: one at
        a time). Cancelling a waiting turn takes it out of the line.
        """
        if not first and len(self._waiting) >= self._max_waiting:
            return fail(BackendBusy(f"{self._max_waiting} subscriber checks are waiting already"))
        turn: Deferred[Slot] = Deferred(canceller=self._leave)
        self._waiting[turn] = None
        if first:
            self._waiting.move_to_end(turn, last=False)
        return turn

    def hand_over(self, slot: Slot) -> bool:
        """Give ``slot`` to the check first in line; False when nobody waits."""
        if not self._waiting:
            return False
        turn, _ = self._waiting.popitem(last=False)
        turn.callback(slot)
        return True

    def fail_all(self, reason: Exception) -> None:
        """Fail every waiting check with ``reason`` (no slot will come soon)."""
        waiting = list(self._waiting)
        self._waiting.clear()
        for turn in waiting:
            turn.errback(reason)

    def _leave(self, turn: Deferred[Slot]) -> None:
        self._waiting.pop(turn, None)
