"""Heartbeats: one keep-alive per stream per interval, spread so no tick writes to all."""

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._heartbeat import HeartbeatService
from sse_twisted._streams import EventStream, StreamRegistry

USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"


def open_streams(registry: StreamRegistry, count: int) -> list[EventStream]:
    streams = []
    for number in range(count):
        request = DummyRequest([b""])
        stream = EventStream(USERID, f"topic-{number}", request, "c", max_unsent_bytes=1000)
        registry.add(stream)
        streams.append(stream)
    return streams


def heartbeats(stream: EventStream) -> int:
    return b"".join(stream.request.written).count(b": keep-alive\n\n")  # type: ignore[attr-defined]


def test_every_stream_gets_one_heartbeat_per_interval_spread_over_the_interval() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 300)  # 30 slices of one batch each, every 5 s
    service = HeartbeatService(registry, interval_seconds=150, clock=clock)
    service.startService()  # the first slice is written at once
    written_per_second = [sum(map(heartbeats, streams))]
    for _ in range(149):
        before = sum(map(heartbeats, streams))
        clock.advance(1)
        written_per_second.append(sum(map(heartbeats, streams)) - before)
    service.stopService()
    assert [heartbeats(stream) for stream in streams] == [1] * 300
    assert written_per_second == ([10] + [0] * 4) * 30


def test_an_instance_with_few_streams_wakes_once_an_interval_for_them() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 3)
    service = HeartbeatService(registry, interval_seconds=15, clock=clock)
    service.startService()
    assert [heartbeats(stream) for stream in streams] == [1] * 3
    assert [call.getTime() for call in clock.getDelayedCalls()] == [15]
    clock.advance(15)
    assert [heartbeats(stream) for stream in streams] == [2] * 3
    service.stopService()


def test_an_instance_with_no_stream_wakes_once_an_interval() -> None:
    clock, registry = Clock(), StreamRegistry()
    service = HeartbeatService(registry, interval_seconds=15, clock=clock)
    service.startService()
    assert [call.getTime() for call in clock.getDelayedCalls()] == [15]
    streams = open_streams(registry, 2)
    clock.advance(15)  # a new round takes the streams opened since
    assert [heartbeats(stream) for stream in streams] == [1] * 2
    service.stopService()


def test_a_stream_closed_during_the_round_is_skipped() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 20)  # two slices: at 0 and at 75
    service = HeartbeatService(registry, interval_seconds=150, clock=clock)
    service.startService()  # the round's snapshot holds all twenty
    for stream in streams[10::2]:
        stream.request.finish()
        registry.remove(stream)
    clock.advance(149)
    service.stopService()
    assert [heartbeats(stream) for stream in streams] == [1] * 10 + [0, 1] * 5


def test_ticks_a_busy_reactor_ran_late_are_made_up() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 300)
    service = HeartbeatService(registry, interval_seconds=150, clock=clock)
    service.startService()
    clock.advance(149)  # one late call standing for 149 ticks
    service.stopService()
    assert [heartbeats(stream) for stream in streams] == [1] * 300


def test_a_slice_larger_than_a_batch_leaves_the_rest_to_later_reactor_turns() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 150 * 25)  # slices of 25 streams
    service = HeartbeatService(registry, interval_seconds=150, clock=clock)
    service.startService()
    assert sum(map(heartbeats, streams)) == 10
    # The rest is a call for the next reactor turn (a Clock runs the whole chain at once).
    assert [call.getTime() for call in clock.getDelayedCalls()] == [0, 1]
    clock.advance(0)
    assert sum(map(heartbeats, streams)) == 25
    assert service.keep_alives_written == 25
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_stopping_between_batches_writes_no_more() -> None:
    clock, registry = Clock(), StreamRegistry()
    streams = open_streams(registry, 150 * 25)
    service = HeartbeatService(registry, interval_seconds=150, clock=clock)
    service.startService()
    service.stopService()
    clock.advance(0)
    assert sum(map(heartbeats, streams)) == 10
    assert clock.getDelayedCalls() == []
