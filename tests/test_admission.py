"""Admission under load: the per-address count of checks and the summarised refusal log."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.task import Clock
from twisted.logger import LogEvent

from sse_twisted._admission import ChecksPerClient, RefusalLog


def test_each_address_has_its_own_count_up_to_the_limit() -> None:
    checks = ChecksPerClient(limit=2)
    assert checks.take("192.0.2.1") and checks.take("192.0.2.1")
    assert not checks.take("192.0.2.1")
    assert checks.take("192.0.2.2")
    checks.give_back("192.0.2.1")
    assert checks.take("192.0.2.1")  # the refusal counted nothing: one place was free
    assert not checks.take("192.0.2.1")


def test_an_address_with_nothing_in_flight_is_forgotten() -> None:
    checks = ChecksPerClient(limit=4)
    checks.take("192.0.2.1")
    checks.take("192.0.2.1")
    checks.give_back("192.0.2.1")
    assert len(checks) == 1
    checks.give_back("192.0.2.1")
    assert len(checks) == 0  # a flood of addresses leaves no memory behind


def test_refusals_are_logged_once_per_interval_with_the_count_since_the_last_line(
    log_events: Sequence[LogEvent],
) -> None:
    clock = Clock()
    refusals = RefusalLog(clock, interval_seconds=10)
    for _ in range(3):
        refusals.refused("too_many_checks", "too many", "192.0.2.1", None)
        clock.advance(1)
    refusals.refused("auth_queue_full", "line full", "192.0.2.2", None)  # its own kind
    clock.advance(8)
    refusals.refused("too_many_checks", "too many", "192.0.2.3", "abc")
    lines = [(event["kind"], event["count"], event["client"]) for event in log_events]
    assert lines == [
        ("too_many_checks", 1, "192.0.2.1"),
        ("auth_queue_full", 1, "192.0.2.2"),
        ("too_many_checks", 3, "192.0.2.3"),
    ]
    assert all(event["log_level"].name == "warn" for event in log_events)
