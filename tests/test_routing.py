"""Routing: every stream of the user, only the topic when given, never another user."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._metrics import Metrics
from sse_twisted._replay import ReplayWindow
from sse_twisted._router import MessageRouter
from sse_twisted._streams import EventStream, StreamRegistry
from tests.sse_parser import EventParser
from tests.test_metrics import value

ALICE = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
BOB = "5d2c7b1a-3e4f-4a6b-8c9d-0e1f2a3b4c5d"
NEWS = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"
ALERTS = "1c2d3e4f-5a6b-4c7d-9e8f-0a1b2c3d4e5f"


def open_stream(registry: StreamRegistry, userid: str, topic: str) -> EventStream:
    stream = EventStream(
        userid, topic, DummyRequest([b""]), correlation_id="test", max_unsent_bytes=1000
    )
    registry.add(stream)
    return stream


def router_for(
    registry: StreamRegistry, window: ReplayWindow | None = None, metrics: Metrics | None = None
) -> MessageRouter:
    return MessageRouter(
        registry,
        ReplayWindow(Clock(), 60, 100) if window is None else window,
        max_message_bytes=10_000,
        metrics=Metrics() if metrics is None else metrics,
    )


def received(stream: EventStream) -> list[dict[str, str]]:
    return EventParser().feed(b"".join(stream.request.written))  # type: ignore[attr-defined]


def body(userid: str, **extra: object) -> bytes:
    message = {"type": "foundcontract", "userid": userid, "filename": "f", "filepath": "/f"}
    message.update(finished=True, **extra)
    return json.dumps(message, indent=2).encode()


def test_every_tab_of_the_user_receives_and_other_users_do_not() -> None:
    registry = StreamRegistry()
    tabs = [open_stream(registry, ALICE, NEWS), open_stream(registry, ALICE, ALERTS)]
    bobs = open_stream(registry, BOB, NEWS)
    router_for(registry)(body(ALICE), 5)
    for tab in tabs:
        [event] = received(tab)
        assert event["id"] == "5"
        assert json.loads(event["data"])["userid"] == ALICE
    assert received(bobs) == []


def test_a_message_with_a_topic_reaches_only_that_topic() -> None:
    registry = StreamRegistry()
    news, alerts = open_stream(registry, ALICE, NEWS), open_stream(registry, ALICE, ALERTS)
    router_for(registry)(body(ALICE, topic=NEWS), 6)
    assert [event["id"] for event in received(news)] == ["6"]
    assert received(alerts) == []


def test_removed_streams_receive_nothing_and_leave_no_entry() -> None:
    registry = StreamRegistry()
    stream = open_stream(registry, ALICE, NEWS)
    registry.remove(stream)
    registry.remove(stream)
    router_for(registry)(body(ALICE), 1)
    assert received(stream) == []
    assert len(registry) == 0
    assert registry._by_user == {}


def test_an_invalid_message_is_logged_with_offset_and_reason_and_skipped() -> None:
    registry = StreamRegistry()
    stream = open_stream(registry, ALICE, NEWS)
    with capturedLogs() as events:
        router = router_for(registry)
        router(b'{"type": "foundcontract", "userid": "nobody"}', 41)
        router(b"x" * 20_000, 42)
        router(body(ALICE), 43)
    skipped = [
        event
        for event in events
        if event.get("log_namespace") == "sse_twisted._router.MessageRouter"
    ]
    assert [(event["offset"], event["reason"]) for event in skipped] == [
        (41, "field 'userid' is not a UUID"),
        (42, "20000 bytes is over the limit of 10000"),
    ]
    assert len(skipped[1]["preview"]) == 200
    assert [event["id"] for event in received(stream)] == ["43"]


def test_a_message_for_a_user_with_no_stream_here_is_replayed_as_if_it_had_been_delivered() -> None:
    registry = StreamRegistry()
    alices = open_stream(registry, ALICE, NEWS)
    window = ReplayWindow(Clock(), 60, 100)
    router = router_for(registry, window)
    router(body(ALICE, topic=NEWS.upper()), 7)
    router(body(BOB, topic=NEWS.upper()), 8)
    [delivered] = received(alices)
    [replayed] = EventParser().feed(b"".join(window.replay(BOB, NEWS, "6").frames))
    assert (replayed["id"], replayed["data"]) == ("8", delivered["data"].replace(ALICE, BOB))
    assert window.replay(BOB, ALERTS, "6").frames == []


def test_an_invalid_message_for_a_user_with_no_stream_is_refused_when_a_replay_needs_it() -> None:
    registry = StreamRegistry()
    window = ReplayWindow(Clock(), 60, 100)
    metrics = Metrics()
    router = router_for(registry, window, metrics)
    with capturedLogs() as consumed:
        router(b'{"type": "foundcontract", "userid": "%s"}' % BOB.encode(), 41)
        router(body(BOB), 42)
    assert consumed == []
    with capturedLogs() as replaying:
        first = window.replay(BOB, NEWS, "40").frames
        again = window.replay(BOB, NEWS, "40").frames
    assert [event["id"] for event in EventParser().feed(b"".join(first))] == ["42"]
    assert again == first
    # Logged and counted once, as it would have been at consumption.
    assert [(event["offset"], event["reason"]) for event in replaying] == [
        (41, "missing field 'filename'")
    ]
    assert value(metrics, "sse_messages_skipped_total", reason="bad_field") == 1
    assert window.newest == 42


CAROL = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
USERS = [ALICE, BOB, CAROL]
TOPICS = [NEWS, ALERTS]
# Other users' ids and SSE field text hidden in fields that must not steer routing.
decoys = st.sampled_from([*USERS, *TOPICS, "\n", "\r\n\r\n", "data: ", "id: 1", "userid"])
messages = st.fixed_dictionaries(
    {
        "userid": st.sampled_from(USERS),
        "upper": st.booleans(),
        "topic": st.none() | st.sampled_from(TOPICS),
        "note": st.lists(decoys, max_size=4).map("".join),
        "nested": st.dictionaries(st.sampled_from(["userid", "topic"]), decoys, max_size=2),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    tabs=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(TOPICS)), max_size=10),
    sent=st.lists(messages, max_size=8),
)
def test_a_message_reaches_exactly_its_users_streams_on_its_topic_and_no_other_stream(
    tabs: list[tuple[str, str]], sent: list[dict[str, object]]
) -> None:
    registry = StreamRegistry()
    streams = [open_stream(registry, userid, topic) for userid, topic in tabs]
    router = router_for(registry)
    for offset, message in enumerate(sent):
        userid = str(message["userid"])
        extra = {"note": message["note"], "data": message["nested"]}
        if message["topic"] is not None:
            extra["topic"] = message["topic"]
        router(body(userid.upper() if message["upper"] else userid, **extra), offset)
    for stream, (userid, topic) in zip(streams, tabs, strict=True):
        expected = [
            str(offset)
            for offset, message in enumerate(sent)
            if message["userid"] == userid and message["topic"] in (None, topic)
        ]
        events = received(stream)
        assert [event["id"] for event in events] == expected
        assert all(json.loads(event["data"])["userid"].lower() == userid for event in events)


@settings(max_examples=300, deadline=None)
@given(
    tabs=st.lists(st.tuples(st.sampled_from(USERS), st.sampled_from(TOPICS)), max_size=4),
    sent=st.lists(messages, max_size=8),
)
def test_the_replay_of_each_user_and_topic_holds_exactly_its_messages_stream_open_or_not(
    tabs: list[tuple[str, str]], sent: list[dict[str, object]]
) -> None:
    registry = StreamRegistry()
    for userid, topic in tabs:
        open_stream(registry, userid, topic)
    window = ReplayWindow(Clock(), 60, 100)
    router = router_for(registry, window)
    for offset, message in enumerate(sent):
        userid = str(message["userid"])
        extra = {"note": message["note"]}
        if message["nested"]:
            extra["data"] = message["nested"]
        if message["topic"] is not None:
            extra["topic"] = message["topic"]
        router(body(userid.upper() if message["upper"] else userid, **extra), offset)
    for userid in USERS:
        for topic in TOPICS:
            expected = [
                str(offset)
                for offset, message in enumerate(sent)
                if message["userid"] == userid and message["topic"] in (None, topic)
            ]
            events = EventParser().feed(b"".join(window.replay(userid, topic, "-1").frames))
            assert [event["id"] for event in events] == expected
            assert all(json.loads(event["data"])["userid"].lower() == userid for event in events)
