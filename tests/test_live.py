"""Where a new stream's live events start, with a fake clock (the real processes are in
tests/test_read_back.py)."""

import json

from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._framing import event_frame
from sse_twisted._live import LiveStart
from sse_twisted._replay import ReplayWindow
from sse_twisted._streams import EventStream, StreamRegistry
from tests.sse_parser import EventParser

ALICE = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
NEWS = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.registry = StreamRegistry()
        self.window = ReplayWindow(self.clock, max_age_seconds=60, max_events=100)
        self.live = LiveStart(self.registry, self.window, self.clock, future_id_grace_seconds=2)

    def open(self, last_event_id: str | None = None) -> DummyRequest:
        """A stream as SubscribeResource opens it: replay, start, register, write the head."""
        request = DummyRequest([b""])
        stream = EventStream(ALICE, NEWS, request, "c", max_unsent_bytes=100_000)
        head = []
        if last_event_id is not None:
            replay = self.window.replay(ALICE, NEWS, last_event_id)
            head += replay.frames
            stream.resume_after = replay.resume_after
            stream.coverage_unknown = replay.coverage_unknown
        head += self.live.start(stream, last_event_id)
        self.registry.add(stream)
        request.write(b"".join(head))
        return request

    def consume(self, *offsets: int) -> None:
        """What the router does with a message of ALICE at each offset."""
        for offset in offsets:
            frame = event_frame(b'{"n":%d}' % offset, offset)
            self.window.record(ALICE, None, offset, frame)
            self.registry.deliver(ALICE, None, offset, frame)


def events(request: DummyRequest) -> list[dict[str, str]]:
    return EventParser().feed(b"".join(request.written))


def test_a_stream_opened_before_the_tail_is_known_gets_only_what_follows_it() -> None:
    setup = Setup()
    setup.consume(1, 2)
    held = setup.open()
    setup.consume(3)
    assert b"".join(held.written) == b""
    # The probe tells late: the consumer already read past the tail.
    setup.consume(4, 5)
    setup.live.tail_known(3)
    setup.consume(6)
    assert [event["id"] for event in events(held)] == ["4", "5", "6"]
    assert b"".join(held.written).startswith(b"id: 3\n\n")


def test_a_stream_opened_during_the_read_back_is_given_the_tail_as_its_first_id() -> None:
    setup = Setup()
    setup.live.tail_known(9)
    setup.consume(1, 2)
    fresh = setup.open()
    setup.consume(*range(3, 11))
    assert b"".join(fresh.written).startswith(b"id: 9\n\n")
    assert [event["id"] for event in events(fresh)] == ["10"]


def test_the_grace_of_an_id_from_the_future_starts_at_the_end_of_the_read_back() -> None:
    setup = Setup()
    setup.live.tail_known(3)
    setup.consume(1)
    ahead = setup.open("50")
    setup.clock.advance(10)
    assert events(ahead) == []
    setup.consume(2, 3)
    setup.live.caught_up()
    setup.clock.advance(1.9)
    assert events(ahead) == []
    setup.clock.advance(0.1)
    [reset] = events(ahead)
    assert reset["event"] == "reset"
    assert json.loads(reset["data"]) == {"lastEventId": "50", "resumeFrom": 4}
    assert reset["id"] == "3"
    setup.consume(4)
    assert [event["id"] for event in events(ahead)] == ["3", "4"]


def test_an_id_the_consumer_passes_within_the_grace_gets_no_reset_and_no_repeat() -> None:
    setup = Setup()
    setup.live.tail_known(1)
    setup.live.caught_up()
    setup.consume(1)
    ahead = setup.open("3")
    setup.consume(2, 3, 4)
    setup.clock.advance(2)
    assert [event["id"] for event in events(ahead)] == ["4"]


def test_a_new_stream_resets_every_open_stream_with_an_id_that_replays_it_once() -> None:
    setup = Setup()
    setup.live.tail_known(-1)
    setup.consume(40, 41)
    request = setup.open()
    setup.live.new_stream(41)
    setup.consume(0, 1)
    received = events(request)
    assert received[0]["event"] == "reset"
    assert json.loads(received[0]["data"]) == {"lastEventId": "41", "resumeFrom": 0}
    assert received[0]["id"] == "-1"
    assert [event["id"] for event in received[1:]] == ["0", "1"]
    again = setup.open("-1")
    assert [(event["event"], event["id"]) for event in events(again)] == [
        ("message", "0"),
        ("message", "1"),
    ]


def test_a_tail_told_before_the_read_back_arrives_leaves_the_coverage_to_the_read_back() -> None:
    setup = Setup()
    setup.live.tail_known(9)  # the probe was quicker than the first read-back delivery
    assert setup.window.covered_from is None
    setup.consume(*range(10))
    resumed = setup.open("3")
    assert [event["id"] for event in events(resumed)] == ["4", "5", "6", "7", "8", "9"]


def test_when_nothing_is_read_back_the_window_starts_after_the_newest_offset() -> None:
    setup = Setup()
    early = setup.open("3")  # before anything is known: its coverage is settled later
    setup.live.nothing_read_back(9)
    setup.live.tail_known(9)
    [reset] = events(early)
    assert (reset["event"], reset["id"]) == ("reset", "9")
    assert json.loads(reset["data"]) == {"lastEventId": "3", "resumeFrom": 10}
    current = setup.open("9")
    setup.live.caught_up()
    setup.clock.advance(3)
    setup.consume(10)
    assert [event["id"] for event in events(early)] == ["9", "10"]
    assert [(event["event"], event["id"]) for event in events(current)] == [("message", "10")]
