"""The replay window: what a reconnecting browser is sent first, and the gap signal."""

import json

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._framing import event_frame
from sse_twisted._metrics import Metrics
from sse_twisted._replay import ReplayWindow
from sse_twisted._router import MessageRouter
from sse_twisted._shard import WindowsTotal
from sse_twisted._streams import EventStream, StreamRegistry
from tests.sse_parser import EventParser

ALICE = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
BOB = "5d2c7b1a-3e4f-4a6b-8c9d-0e1f2a3b4c5d"
NEWS = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"
ALERTS = "1c2d3e4f-5a6b-4c7d-9e8f-0a1b2c3d4e5f"


def fill(window: ReplayWindow, *events: tuple[int, str, str | None]) -> None:
    for offset, userid, topic in events:
        window.record(userid, topic, offset, event_frame(b'{"n":%d}' % offset, offset))


def replayed(frames: list[bytes]) -> list[dict[str, str]]:
    return EventParser().feed(b"".join(frames))


def test_a_resuming_stream_gets_the_users_later_events_in_order() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100)
    fill(window, (10, ALICE, None), (11, BOB, None), (12, ALICE, None), (13, ALICE, None))
    replay = window.replay(ALICE, NEWS, "10")
    assert [event["id"] for event in replayed(replay.frames)] == ["12", "13"]
    assert replay.resume_after == 10
    assert not replay.coverage_unknown


def test_only_events_for_the_streams_topic_or_for_every_topic_are_replayed() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100)
    fill(window, (1, ALICE, NEWS), (2, ALICE, ALERTS), (3, ALICE, None))
    assert [e["id"] for e in replayed(window.replay(ALICE, NEWS, "0").frames)] == ["1", "3"]


def test_an_id_older_than_the_window_is_told_with_a_reset_event_first() -> None:
    clock = Clock()
    window = ReplayWindow(clock, max_age_seconds=60, max_events=100)
    fill(window, (5, ALICE, None))
    clock.advance(61)
    fill(window, (6, BOB, None), (7, ALICE, None))
    events = replayed(window.replay(ALICE, NEWS, "4").frames)
    assert events[0]["event"] == "reset"
    assert json.loads(events[0]["data"]) == {"lastEventId": "4", "resumeFrom": 6}
    assert events[0]["id"] == "5"
    assert [event["id"] for event in events[1:]] == ["7"]
    assert window.covered_from == 6
    assert len(window) == 2


def test_an_id_just_before_the_window_is_not_a_gap() -> None:
    clock = Clock()
    window = ReplayWindow(clock, max_age_seconds=60, max_events=100)
    fill(window, (5, ALICE, None))
    clock.advance(61)
    fill(window, (6, ALICE, None))
    assert [e["event"] for e in replayed(window.replay(ALICE, NEWS, "5").frames)] == ["message"]


def test_an_id_that_is_not_an_offset_is_a_gap() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100)
    fill(window, (3, ALICE, None))
    for garbage in ("abc", "-1", "1e3", "9" * 30, "٣"):
        events = replayed(window.replay(ALICE, NEWS, garbage).frames)
        assert [event["event"] for event in events] == ["reset", "message"]


def test_the_count_bound_evicts_the_oldest_events() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=3)
    fill(window, *((offset, ALICE, None) for offset in range(10)))
    assert len(window) == 3
    assert window.covered_from == 7
    events = replayed(window.replay(ALICE, NEWS, "8").frames)
    assert [event["id"] for event in events] == ["9"]


def test_a_stream_resuming_before_anything_was_consumed_learns_of_a_gap_from_the_first_event() -> (
    None
):
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100)
    replay = window.replay(ALICE, NEWS, "41")
    assert replay.frames == []
    assert replay.coverage_unknown
    registry = StreamRegistry()
    request = DummyRequest([b""])
    stream = EventStream(ALICE, NEWS, request, "c", max_unsent_bytes=10_000, resume_after=41)
    stream.coverage_unknown = True
    registry.add(stream)
    router = MessageRouter(registry, window, max_message_bytes=10_000, metrics=Metrics())
    body = {"type": "foundcontract", "userid": ALICE, "filename": "f", "filepath": "/f"}
    router(json.dumps(body | {"finished": False}).encode(), 50)
    events = EventParser().feed(b"".join(request.written))
    assert [event["event"] for event in events] == ["reset", "message"]
    assert json.loads(events[0]["data"])["resumeFrom"] == 50


def test_live_events_the_browser_already_has_are_not_sent_again() -> None:
    registry = StreamRegistry()
    request = DummyRequest([b""])
    registry.add(EventStream(ALICE, NEWS, request, "c", max_unsent_bytes=10_000, resume_after=7))
    assert registry.deliver(ALICE, None, 7, event_frame(b"{}", 7)) == 0
    assert registry.deliver(ALICE, None, 8, event_frame(b"{}", 8)) == 1
    assert [event["id"] for event in EventParser().feed(b"".join(request.written))] == ["8"]


class _Channel:
    def __init__(self) -> None:
        self.transport = StringTransport()


def test_a_client_that_stops_reading_is_dropped_at_the_cap_and_others_are_not() -> None:
    registry = StreamRegistry()
    slow_request, fast_request = DummyRequest([b""]), DummyRequest([b""])
    slow_request.channel = _Channel()
    frame = event_frame(b"x" * 40, 1)
    cap = 3 * len(frame)
    slow = EventStream(ALICE, NEWS, slow_request, "slow", max_unsent_bytes=cap)
    fast = EventStream(ALICE, ALERTS, fast_request, "fast", max_unsent_bytes=cap)
    registry.add(slow)
    registry.add(fast)
    slow.pauseProducing()
    for offset in range(3):
        registry.deliver(ALICE, None, offset, frame)
    transport = slow_request.channel.transport
    assert not transport.disconnecting
    registry.deliver(ALICE, None, 3, frame)
    assert transport.disconnecting
    assert len(slow_request.written) == 3
    assert len(fast_request.written) == 4


def test_a_client_that_catches_up_is_not_dropped() -> None:
    request = DummyRequest([b""])
    request.channel = _Channel()
    stream = EventStream(ALICE, NEWS, request, "c", max_unsent_bytes=100)
    for _ in range(10):
        stream.pauseProducing()
        stream.write(b"x" * 60)
        stream.resumeProducing()
    assert not request.channel.transport.disconnecting
    assert len(request.written) == 10


def test_a_window_aged_all_at_once_is_evicted_a_batch_per_reactor_turn() -> None:
    clock = Clock()
    window = ReplayWindow(clock, max_age_seconds=60, max_events=10_000)
    fill(window, *((offset, ALICE, None) for offset in range(2500)))
    clock.advance(61)  # a quiet spell: every event has aged
    fill(window, (2500, BOB, None))
    assert len(window) == 1501  # 1,000 evicted in this turn
    assert window.covered_from == 1000
    assert [call.getTime() for call in clock.getDelayedCalls()] == [61]
    clock.advance(0)  # the next turns (a Clock runs the chain at once)
    assert len(window) == 1
    assert window.covered_from == 2500
    assert window.evicted == 2500
    assert clock.getDelayedCalls() == []


def test_the_evictions_of_every_partitions_window_are_summed_for_the_stall_line() -> None:
    clock = Clock()
    windows = [ReplayWindow(clock, max_age_seconds=60, max_events=2) for _ in range(2)]
    fill(windows[0], (0, ALICE, None), (1, ALICE, None), (2, ALICE, None))
    fill(windows[1], *((offset, BOB, None) for offset in range(5)))
    assert WindowsTotal(windows).evicted == 1 + 3
