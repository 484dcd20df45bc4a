"""The bounded line of subscriber checks in front of the PostgreSQL pool (no database here:
tests/test_auth.py runs the same behaviours against a real one)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from sse_twisted._check_line import CheckLine
from sse_twisted.interfaces import BackendBusy, BackendUnavailable


def outcome(turn: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    turn.addBoth(seen.append)
    return seen


def test_checks_are_handed_slots_in_arrival_order() -> None:
    line: CheckLine[str] = CheckLine(max_waiting=3)
    first, second = outcome(line.wait()), outcome(line.wait())
    assert len(line) == 2
    assert line.hand_over("connection A")
    assert (first, second) == (["connection A"], [])
    assert line.hand_over("connection B")
    assert second == ["connection B"]
    assert not line.hand_over("connection C")  # nobody waits: the slot stays free
    assert len(line) == 0


def test_past_the_bound_a_check_is_refused_at_once_and_the_others_keep_their_place() -> None:
    line: CheckLine[str] = CheckLine(max_waiting=2)
    waiting = [outcome(line.wait()) for _ in range(2)]
    refused = outcome(line.wait())
    assert len(refused) == 1 and isinstance(refused[0], Failure)
    assert refused[0].check(BackendBusy)
    # Still a BackendUnavailable: every caller that asks the browser to come back does so.
    assert isinstance(refused[0].value, BackendUnavailable)
    assert refused[0].getErrorMessage() == "2 subscriber checks are waiting already"
    assert len(line) == 2
    line.hand_over("A")
    assert waiting[0] == ["A"]
    assert len(outcome(line.wait())) == 0  # room again


def test_a_cancelled_check_leaves_the_line_and_is_never_handed_a_slot() -> None:
    line: CheckLine[str] = CheckLine(max_waiting=3)
    leaving_turn = line.wait()
    leaving = outcome(leaving_turn)
    staying = outcome(line.wait())
    leaving_turn.cancel()
    assert isinstance(leaving[0], Failure) and leaving[0].check(CancelledError)
    assert len(line) == 1
    line.hand_over("A")
    assert staying == ["A"]
    assert leaving[1:] == []


def test_a_check_whose_wait_times_out_leaves_the_line() -> None:
    clock = Clock()
    line: CheckLine[str] = CheckLine(max_waiting=3)
    timed = line.wait()
    timed.addTimeout(5, clock)
    result = outcome(timed)
    clock.advance(5)
    assert isinstance(result[0], Failure)
    assert len(line) == 0
    assert not line.hand_over("A")


def test_the_first_lane_goes_ahead_and_is_never_refused() -> None:
    line: CheckLine[str] = CheckLine(max_waiting=1)
    waiting = outcome(line.wait())
    probe = outcome(line.wait(first=True))
    assert probe == []  # a full line does not refuse it
    line.hand_over("A")
    assert probe == ["A"] and waiting == []
    line.hand_over("B")
    assert waiting == ["B"]


def test_fail_all_fails_every_waiting_check_and_empties_the_line() -> None:
    line: CheckLine[str] = CheckLine(max_waiting=3)
    waiting = [outcome(line.wait()) for _ in range(3)]
    line.fail_all(BackendUnavailable("no live connection"))
    assert all(isinstance(seen[0], Failure) for seen in waiting)
    assert len(line) == 0
