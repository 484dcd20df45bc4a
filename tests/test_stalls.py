"""The stall monitor with a Clock: reactor lag in its histogram buckets, one log line per
stall with what ran, and collections timed in pairs of gc callbacks."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator, Sequence

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent

from sse_twisted._metrics import Metrics
from sse_twisted._stalls import GarbageCollectionTimer, StallMonitorService
from sse_twisted._ticks import TICK_SECONDS
from tests.logs import json_log


class _Timer:
    """A perf_counter the test sets."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _Counters:
    def __init__(self) -> None:
        self.keep_alives = 0
        self.lines_logged = 0
        self.open_streams = 0


def _bucket(metrics: Metrics, name: str, upper: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"{name}_bucket", {**labels, "le": upper})
    assert value is not None, (name, upper, labels)
    return value


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def timer() -> _Timer:
    return _Timer()


@pytest.fixture
def collections(metrics: Metrics, timer: _Timer) -> Iterator[GarbageCollectionTimer]:
    collections = GarbageCollectionTimer(metrics.gc_pause_seconds, timer)
    yield collections
    collections.uninstall()


def _monitor(
    metrics: Metrics,
    collections: GarbageCollectionTimer,
    counters: _Counters,
    clock: Clock,
    log_seconds: float = 0.05,
    cpu_clock: _Timer | None = None,
) -> StallMonitorService:
    monitor = StallMonitorService(
        clock,
        metrics.reactor_lag_seconds,
        collections,
        log_seconds,
        activity={
            "keep_alives": lambda: counters.keep_alives,
            "lines_logged": lambda: counters.lines_logged,
        },
        gauges={"open_streams": lambda: counters.open_streams},
        cpu_clock=cpu_clock or _Timer(),
    )
    monitor.startService()
    return monitor


def _stall_lines(events: Sequence[LogEvent]) -> list[LogEvent]:
    return [
        event
        for event in events
        if event.get("log_namespace") == "sse_twisted._stalls.StallMonitorService"
    ]


def test_each_tick_observes_how_late_it_ran_in_the_lag_histogram(
    metrics: Metrics, collections: GarbageCollectionTimer
) -> None:
    clock = Clock()
    monitor = _monitor(metrics, collections, _Counters(), clock)
    clock.advance(0)  # the reactor runs: ticking starts
    clock.advance(TICK_SECONDS)  # on time
    clock.advance(TICK_SECONDS + 0.003)  # 3 ms late
    clock.advance(TICK_SECONDS + 0.2)  # 200 ms late
    name = "sse_reactor_lag_seconds"
    assert _bucket(metrics, name, "0.0005") == 1
    assert _bucket(metrics, name, "0.0025") == 1
    assert _bucket(metrics, name, "0.005") == 2
    assert _bucket(metrics, name, "0.1") == 2
    assert _bucket(metrics, name, "0.25") == 3
    assert metrics.registry.get_sample_value(f"{name}_count") == 3
    monitor.stopService()


def test_time_before_the_reactor_runs_is_not_counted_as_lag(
    metrics: Metrics, collections: GarbageCollectionTimer
) -> None:
    clock = Clock()
    monitor = _monitor(metrics, collections, _Counters(), clock)
    clock.advance(5)  # start-up work between startService and the first reactor turn
    clock.advance(TICK_SECONDS)
    assert metrics.registry.get_sample_value("sse_reactor_lag_seconds_count") == 1
    assert _bucket(metrics, "sse_reactor_lag_seconds", "0.0005") == 1
    monitor.stopService()


def test_a_stall_over_the_threshold_logs_one_line_with_what_ran_since_the_last_tick(
    metrics: Metrics,
    collections: GarbageCollectionTimer,
    timer: _Timer,
    log_events: Sequence[LogEvent],
) -> None:
    clock = Clock()
    counters = _Counters()
    counters.keep_alives, counters.lines_logged = 100, 7
    cpu_clock = _Timer()
    monitor = _monitor(metrics, collections, counters, clock, cpu_clock=cpu_clock)
    clock.advance(0)
    clock.advance(TICK_SECONDS + 0.049)  # at 0.099 s, under the 50 ms threshold: no line
    assert _stall_lines(log_events) == []

    counters.keep_alives += 70
    counters.lines_logged += 3
    counters.open_streams = 1000
    cpu_clock.now = 0.0714
    timer.now = 1.0
    collections("start", {"generation": 2})
    timer.now = 1.062
    collections("stop", {"generation": 2, "collected": 12, "uncollectable": 0})
    collections("start", {"generation": 0})
    timer.now = 1.064
    collections("stop", {"generation": 0, "collected": 3, "uncollectable": 0})
    clock.advance(0.001 + 0.080)  # the next tick was due on the grid, at 0.1 s

    [line] = _stall_lines(log_events)
    assert line["lag_ms"] == 80.0
    assert line["cpu_ms"] == 71.4
    assert line["gc_collections"] == 2
    assert line["gc_ms"] == 64.0
    assert line["gc_generation"] == 2
    assert line["gc_collected"] == 15
    assert line["keep_alives"] == 70
    assert line["lines_logged"] == 3
    assert line["open_streams"] == 1000
    clock.advance(0.02)  # the next tick, due at 0.2 s, is on time: no second line
    assert len(_stall_lines(log_events)) == 1
    monitor.stopService()


def test_the_json_log_line_of_a_stall_keeps_every_field(
    metrics: Metrics, collections: GarbageCollectionTimer
) -> None:
    clock = Clock()
    counters = _Counters()
    monitor = _monitor(metrics, collections, counters, clock)
    clock.advance(0)
    counters.keep_alives, counters.lines_logged, counters.open_streams = 5, 2, 30
    with json_log() as written:
        clock.advance(TICK_SECONDS + 0.1)
    [line] = [json.loads(text) for text in written.getvalue().splitlines()]
    expected = {"lag_ms", "cpu_ms", "gc_collections", "gc_ms", "gc_generation", "gc_collected"}
    assert expected | {"keep_alives", "lines_logged", "open_streams"} <= set(line)
    assert (line["keep_alives"], line["lines_logged"], line["open_streams"]) == (5, 2, 30)
    assert (
        line["message"] == "reactor stalled: a tick ran 100.0 ms late (0 ms of garbage collection)"
    )
    monitor.stopService()


def test_a_stall_without_collections_says_none_ran(
    metrics: Metrics, collections: GarbageCollectionTimer, log_events: Sequence[LogEvent]
) -> None:
    clock = Clock()
    monitor = _monitor(metrics, collections, _Counters(), clock)
    clock.advance(0)
    clock.advance(TICK_SECONDS + 0.5)
    [line] = _stall_lines(log_events)
    assert (line["gc_collections"], line["gc_ms"], line["gc_generation"]) == (0, 0.0, None)
    assert line["keep_alives"] == 0
    monitor.stopService()


def test_a_threshold_of_zero_logs_no_stall_but_still_measures(
    metrics: Metrics, collections: GarbageCollectionTimer, log_events: Sequence[LogEvent]
) -> None:
    clock = Clock()
    monitor = _monitor(metrics, collections, _Counters(), clock, log_seconds=0)
    clock.advance(0)
    clock.advance(TICK_SECONDS + 2.0)
    assert _stall_lines(log_events) == []
    assert _bucket(metrics, "sse_reactor_lag_seconds", "+Inf") == 1
    monitor.stopService()


def test_stopping_cancels_the_tick_and_removes_the_gc_callback(
    metrics: Metrics, collections: GarbageCollectionTimer
) -> None:
    clock = Clock()
    monitor = _monitor(metrics, collections, _Counters(), clock)
    assert collections in gc.callbacks
    clock.advance(0)
    monitor.stopService()
    assert collections not in gc.callbacks
    assert clock.getDelayedCalls() == []


def test_each_collection_is_timed_from_its_start_to_its_stop_in_its_generation(
    metrics: Metrics, collections: GarbageCollectionTimer, timer: _Timer
) -> None:
    timer.now = 10.0
    collections("start", {"generation": 1})
    timer.now = 10.003
    collections("stop", {"generation": 1, "collected": 0, "uncollectable": 0})
    name = "sse_gc_pause_seconds"
    assert _bucket(metrics, name, "0.0025", generation="1") == 0
    assert _bucket(metrics, name, "0.005", generation="1") == 1
    assert _bucket(metrics, name, "+Inf", generation="0") == 0
    [pause] = collections.take()
    assert (pause.generation, round(pause.seconds, 6)) == (1, 0.003)
    assert collections.take() == []


def test_a_stop_whose_start_was_not_seen_is_not_a_pause(
    metrics: Metrics, collections: GarbageCollectionTimer, timer: _Timer
) -> None:
    timer.now = 5.0
    collections("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    collections("start", {"generation": 0})
    collections("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    timer.now = 6.0
    collections("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    assert [pause.generation for pause in collections.take()] == [0]
    assert metrics.registry.get_sample_value("sse_gc_pause_seconds_count", {"generation": "2"}) == 0


def test_installed_it_times_the_interpreters_own_collections(metrics: Metrics) -> None:
    collections = GarbageCollectionTimer(metrics.gc_pause_seconds)
    collections.install()
    collections.install()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        collections.uninstall()
    assert collections not in gc.callbacks
    assert {1, 2} <= {pause.generation for pause in collections.take()}
    gc.collect()
    assert collections.take() == []
