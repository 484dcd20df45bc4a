"""What the replay costs in memory: the window's byte bound, and replays paced by the
transport under the slow-client cap (a resumer that does not read holds a transport
buffer, not its replay)."""

from __future__ import annotations

import json
import ssl
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._framing import event_frame
from sse_twisted._heartbeat import HeartbeatService
from sse_twisted._metrics import Metrics
from sse_twisted._replay import ReplayWindow
from sse_twisted._streams import EventStream, StreamRegistry
from tests.backends import Pki, free_port
from tests.browser import Browser
from tests.in_process_server import RunningServer, socket_transport, start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.sse_parser import EventParser
from tests.subscribers import add_local_subscriber
from tests.test_limits import _raw_connection
from tests.test_metrics_flow import scrape
from tests.waiting import bounded, wait_for

ALICE = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
BOB = "5d2c7b1a-3e4f-4a6b-8c9d-0e1f2a3b4c5d"
NEWS = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"


def _frame(offset: int, size: int = 1000) -> bytes:
    return event_frame(b'{"pad":"' + b"p" * size + b'"}', offset)


def test_the_byte_bound_evicts_the_oldest_events_and_a_resume_before_them_gets_reset() -> None:
    frames = {offset: _frame(offset) for offset in range(10)}
    # Room for three frames and a half: the fourth newest does not fit.
    bound = 3 * len(frames[9]) + len(frames[9]) // 2
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100, max_bytes=bound)
    for offset, frame in frames.items():
        window.record(ALICE if offset % 2 else BOB, None, offset, frame)
    assert len(window) == 3
    assert window.bytes == 3 * len(frames[9]) <= bound
    assert window.covered_from == 7
    events = EventParser().feed(b"".join(window.replay(ALICE, NEWS, "0").frames))
    assert events[0]["event"] == "reset"
    assert json.loads(events[0]["data"]) == {"lastEventId": "0", "resumeFrom": 7}
    assert [event["id"] for event in events[1:]] == ["7", "9"]
    assert [
        e["id"] for e in EventParser().feed(b"".join(window.replay(ALICE, NEWS, "6").frames))
    ] == [
        "7",
        "9",
    ]


def test_the_window_bytes_follow_every_eviction_by_age_count_and_size() -> None:
    clock = Clock()
    window = ReplayWindow(clock, max_age_seconds=60, max_events=4, max_bytes=10_000)
    window.record(ALICE, None, 0, _frame(0, 3000))
    window.record(ALICE, None, 1, _frame(1, 3000))
    assert window.bytes == len(_frame(0, 3000)) + len(_frame(1, 3000))
    # One event larger than the whole bound is not kept, and neither is what precedes it.
    window.record(BOB, None, 2, _frame(2, 20_000))
    assert (len(window), window.bytes, window.covered_from) == (0, 0, 3)
    for offset in range(3, 9):
        window.record(ALICE, None, offset, _frame(offset, 10))
    assert len(window) == 4
    assert window.bytes == sum(len(_frame(offset, 10)) for offset in range(5, 9))
    clock.advance(61)
    window.replay(ALICE, NEWS, "8")
    assert (len(window), window.bytes, window.covered_from) == (0, 0, 9)


def test_clearing_the_window_for_a_new_stream_frees_its_bytes_too() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100, max_bytes=10_000)
    for offset in range(5):
        window.record(ALICE, None, offset, _frame(offset, 1000))
    window.clear()
    # Stale bytes would evict the new stream's events long before the bound.
    window.record(ALICE, None, 0, _frame(0, 9000))
    assert (len(window), window.bytes) == (1, len(_frame(0, 9000)))


def test_a_message_kept_unread_counts_its_body_then_its_frame_once_decoded() -> None:
    window = ReplayWindow(Clock(), max_age_seconds=60, max_events=100, max_bytes=10_000)
    decoded = {0: (None, _frame(0, 3000)), 1: None}
    window.decode = lambda body, offset: decoded[offset]
    window.record_unread(ALICE, 0, b"b" * 2000)
    window.record_unread(ALICE, 1, b"b" * 500)
    assert window.bytes == 2500
    window.replay(ALICE, NEWS, "-1")
    # The refused one holds nothing; the frame's size replaces the body's.
    assert window.bytes == len(_frame(0, 3000))
    window.record_unread(BOB, 2, b"b" * 7000)
    assert (len(window), window.bytes) == (2, 7000)


class _PacedRequest(DummyRequest):
    """A request over a transport that takes ``room`` bytes, then pauses its producer
    until L{drain} (the client read them)."""

    def __init__(self, room: int) -> None:
        super().__init__([b""])
        self.channel = type("Channel", (), {"transport": StringTransport()})()
        self.room = room
        self.buffered = 0
        self.most_buffered = 0
        self.producer: Any = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def write(self, data: bytes) -> None:
        super().write(data)
        self.buffered += len(data)
        self.most_buffered = max(self.most_buffered, self.buffered)
        if self.buffered > self.room and not self.producer.paused:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.buffered = 0
        self.producer.resumeProducing()


def _paced_stream(
    room: int, cap: int, metrics: Metrics | None = None
) -> tuple[EventStream, _PacedRequest]:
    request = _PacedRequest(room)
    stream = EventStream(ALICE, NEWS, request, "c", max_unsent_bytes=cap, metrics=metrics)
    request.registerProducer(stream, True)
    return stream, request


def test_a_replay_far_over_the_cap_reaches_a_reading_client_in_order_with_live_events_after() -> (
    None
):
    replay = [_frame(offset) for offset in range(200)]
    stream, request = _paced_stream(room=4096, cap=4096)
    stream.send_first([b": connected\n\n", *replay])
    # Handed over as the transport drains: never much more than it takes at a time.
    assert sum(map(len, request.written)) < 4096 + 65536 + len(replay[0])
    live = [_frame(offset) for offset in range(200, 203)]
    for frame in live:
        stream.write(frame)
    while stream.paused:
        request.drain()
    assert not request.channel.transport.disconnecting
    assert request.most_buffered < 4096 + 65536 + len(replay[0])
    events = EventParser().feed(b"".join(request.written))
    assert [event["id"] for event in events] == [str(offset) for offset in range(203)]
    # Once the backlog is out, live events go straight to the transport again.
    stream.write(_frame(203))
    assert request.written[-1] == _frame(203)


def test_live_events_queued_behind_a_replay_past_the_cap_drop_a_client_that_does_not_read() -> None:
    stream, request = _paced_stream(room=4096, cap=3000)
    stream.send_first([_frame(offset) for offset in range(200)])
    assert stream.paused
    written = len(request.written)
    stream.write(_frame(200))
    stream.write(_frame(201))
    assert not request.channel.transport.disconnecting
    stream.write(_frame(202))
    assert request.channel.transport.disconnecting
    assert len(request.written) == written


def _heartbeats(streams: list[EventStream], clock: Clock) -> HeartbeatService:
    registry = StreamRegistry()
    for stream in streams:
        registry.add(stream)
    service = HeartbeatService(registry, interval_seconds=15, clock=clock)
    service.startService()
    return service


def test_a_resumer_that_takes_nothing_of_a_replay_over_the_cap_for_a_heartbeat_interval_goes() -> (
    None
):
    clock = Clock()
    metrics = Metrics()
    not_reading, not_reading_request = _paced_stream(room=4096, cap=3000, metrics=metrics)
    small, small_request = _paced_stream(room=4096, cap=3000, metrics=metrics)
    reading, reading_request = _paced_stream(room=4096, cap=3000, metrics=metrics)
    not_reading.send_first([_frame(offset) for offset in range(200)])
    # What waits for this one is within the cap: as for live events, it may wait.
    small.send_first([_frame(offset) for offset in range(6)])
    reading.send_first([_frame(offset) for offset in range(200)])
    service = _heartbeats([not_reading, small, reading], clock)
    # Each stream's heartbeats are 15 s apart, the first within 15 s: the third finds
    # nothing taken since the first.
    for _ in range(46):
        clock.advance(1)
        reading_request.drain()
    service.stopService()
    assert not_reading_request.channel.transport.disconnecting
    assert metrics.slow_client_disconnects._value.get() == 1
    assert not small_request.channel.transport.disconnecting
    assert not reading_request.channel.transport.disconnecting


def test_a_resumer_is_not_dropped_before_a_whole_heartbeat_interval_without_progress() -> None:
    clock = Clock()
    stream, request = _paced_stream(room=4096, cap=3000)
    # 2 MB: a drain lets about 70 KB more go.
    stream.send_first([_frame(offset) for offset in range(2000)])
    # A lone stream's heartbeats are at 0 s, then every 15 s.
    service = _heartbeats([stream], clock)
    for second in range(1, 135):
        clock.advance(1)
        if second % 10 == 0 and second <= 100:
            # Reads a little every 10 s: each heartbeat sees progress since the one before.
            request.drain()
    # The last read was at 100 s; the heartbeats at 105 and 120 s find nothing taken
    # since, and the one at 135 s drops it.
    assert not request.channel.transport.disconnecting
    clock.advance(1)
    service.stopService()
    assert request.channel.transport.disconnecting


def _resume_request(topic: str, userid: str, token: str, last_event_id: str) -> bytes:
    return (
        f"GET /subscribe/{topic}/{userid}/{token} HTTP/1.1\r\nHost: localhost\r\n"
        f"Last-Event-ID: {last_event_id}\r\n\r\n"
    ).encode()


def _held_for(stream: Any) -> int:
    """The bytes the server holds in the transports of ``stream``'s connection: what TLS
    has not encrypted yet and what TCP has not handed to the kernel."""
    transport = stream.request.channel.transport
    held = 0
    while transport is not None:
        aggregator = getattr(transport, "_aggregator", None)
        if aggregator is not None:
            held += sum(map(len, aggregator._buffer))
        if transport is socket_transport(transport):
            return held + len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        transport = transport.transport
    return held


@pytest.fixture
def plaintext_environ(plaintext_environ: dict[str, str]) -> dict[str, str]:
    """The local plaintext backends, with metrics; logs to stdout only (an in-process
    server never closes its daily log file)."""
    environ = {name: value for name, value in plaintext_environ.items() if name != "SSE_LOGS_DIR"}
    return {**environ, "SSE_METRICS_PORT": str(free_port())}


@pytest_twisted.ensureDeferred
async def test_a_resume_older_than_the_byte_bound_gets_reset_then_the_retained_tail(
    plaintext_environ: dict[str, str], browser: Browser
) -> None:
    bound = 50_000
    server = await start_server({**plaintext_environ, "SSE_REPLAY_MAX_BYTES": str(bound)})
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        sent = [found_contract(userid, n=n, pad="p" * 5000) for n in range(30)]
        await publish(server.config.rabbitmq_port, server.config.rabbitmq_queue_name, *sent)
        live = [await tab.next_event() for _ in sent]
        _, resumed = await browser.open(
            server.subscribe_url(new_uuid(), userid, token), last_event_id=live[0]["id"]
        )
        reset = await resumed.next_event()
        assert reset["event"] == "reset"
        resume_from = json.loads(reset["data"])["resumeFrom"]
        tail = [event for event in live if int(event["id"]) >= resume_from]
        # About 5 KB each: the bound keeps nine, the count bound would keep them all.
        assert 5 <= len(tail) <= 10
        assert [await resumed.next_event() for _ in tail] == tail
        metrics = await scrape(int(plaintext_environ["SSE_METRICS_PORT"]))
        assert 0 < metrics[("sse_replay_window_bytes", ())] <= bound
        assert metrics[("sse_replay_window_events", ())] == len(tail)
        assert metrics[("sse_replay_window_max_bytes", ())] == bound
    finally:
        await browser.close_all()
        await server.stop()


async def _fill_window(
    server: RunningServer, browser: Browser, userid: str, token: str, count: int
) -> tuple[str, list[dict[str, Any]]]:
    """Publish a small event for the user, then ``count`` of 100 KB; return the first's id
    and the others, once they are all in the replay window."""
    queue = server.config.rabbitmq_queue_name
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await publish(server.config.rabbitmq_port, queue, found_contract(userid, n="first"))
    first_id = (await tab.next_event())["id"]
    # The tab is not there for the big ones: it could be a slow client of a small cap.
    tab.close()
    registry = server.service.registry
    await wait_for(lambda: registry.count_of(userid) == 0, "tab not closed")
    sent = [found_contract(userid, n=n, pad="p" * 100_000) for n in range(count)]
    await publish(server.config.rabbitmq_port, queue, *sent)
    consumer = server.service.consumer
    await wait_for(lambda: consumer.last_offset == int(first_id) + count, "not consumed")
    return first_id, sent


async def _resume_without_reading(
    pki: Pki, server: RunningServer, userid: str, token: str, last_event_id: str, count: int
) -> list[ssl.SSLSocket]:
    """``count`` HTTP/1.1 TLS connections of ``userid`` resuming after ``last_event_id``,
    with a 4 KiB receive buffer, that never read."""
    connections = []
    for _ in range(count):
        connection = await bounded(
            deferToThread(_raw_connection, pki, server.port, receive_buffer=4096)
        )
        connections.append(connection)
        request = _resume_request(new_uuid(), userid, token, last_event_id)
        await bounded(deferToThread(connection.sendall, request))
    return connections


_NOT_READING = 16
_CAP = 64 * 1024
# A stream holds at most what the transport took before it paused the stream (its 64 KiB
# buffer) and the write that crossed it (one batch, or one frame larger than a batch).
_MOST_HELD_PER_STREAM = 64 * 1024 + 110_000


@pytest_twisted.ensureDeferred
async def test_resumers_that_do_not_read_hold_a_transport_buffer_not_the_replay_and_are_dropped(
    plaintext_environ: dict[str, str], pki: Pki, browser: Browser
) -> None:
    server = await start_server(
        {
            **plaintext_environ,
            "SSE_MAX_BUFFER_BYTES": str(_CAP),
            "SSE_MAX_STREAMS_PER_USER": str(_NOT_READING + 2),
        }
    )
    registry = server.service.registry
    metrics_port = int(plaintext_environ["SSE_METRICS_PORT"])
    connections: list[ssl.SSLSocket] = []
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        # A replay of about 4 MB.
        first_id, sent = await _fill_window(server, browser, userid, token, 40)
        connections += await _resume_without_reading(
            pki, server, userid, token, first_id, _NOT_READING
        )
        await wait_for(lambda: registry.count_of(userid) == _NOT_READING, "not all open")
        not_reading = registry.streams_of(userid)
        await wait_for(lambda: all(s.paused for s in not_reading), "not all paused")
        held = [_held_for(stream) for stream in not_reading]
        assert max(held) <= _MOST_HELD_PER_STREAM, held

        # A client that reads gets the whole replay, 4 MB past the 64 KiB cap, in order.
        _, reader = await browser.open(
            server.subscribe_url(new_uuid(), userid, token), last_event_id=first_id
        )
        replayed = [await reader.next_event() for _ in sent]
        assert [json.loads(event["data"]) for event in replayed] == sent
        assert [int(event["id"]) for event in replayed] == list(
            range(int(first_id) + 1, int(first_id) + 41)
        )

        # New events queue behind the replay the others never took: past the cap, they go.
        more = [found_contract(userid, n=n, pad="p" * 40_000) for n in range(40, 42)]
        await publish(server.config.rabbitmq_port, server.config.rabbitmq_queue_name, *more)
        await wait_for(lambda: registry.count_of(userid) == 1, "non-readers not dropped")
        metrics = await scrape(metrics_port)
        assert metrics[("sse_slow_client_disconnects_total", ())] == _NOT_READING
        assert [json.loads((await reader.next_event())["data"]) for _ in more] == more
    finally:
        for connection in connections:
            connection.close()
        await browser.close_all()
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_resumers_that_take_nothing_of_their_replay_are_dropped_without_new_events(
    plaintext_environ: dict[str, str], pki: Pki, browser: Browser
) -> None:
    server = await start_server(
        {**plaintext_environ, "SSE_MAX_BUFFER_BYTES": str(_CAP), "SSE_HEARTBEAT_SECONDS": "0.3"}
    )
    registry = server.service.registry
    connections: list[ssl.SSLSocket] = []
    try:
        database = plaintext_environ["SSE_POSTGRES_DB_NAME"]
        userid, token = add_local_subscriber(database)
        other, other_token = add_local_subscriber(database)
        _, others_tab = await browser.open(server.subscribe_url(new_uuid(), other, other_token))
        # 6 MB: more than the kernel's send buffers take for each (4 MB at most here).
        first_id, _ = await _fill_window(server, browser, userid, token, 60)
        connections += await _resume_without_reading(pki, server, userid, token, first_id, 2)
        # Within three heartbeats of their pause: no resume, more than the cap waiting.
        metrics_port = int(plaintext_environ["SSE_METRICS_PORT"])
        dropped = ("sse_slow_client_disconnects_total", ())
        for _ in range(20):
            metrics = await scrape(metrics_port)
            if metrics[dropped] == 2:
                break
            await deferLater(reactor, 0.3, lambda: None)
        assert metrics[dropped] == 2
        assert registry.count_of(userid) == 0
        # A stream with nothing waiting gets its heartbeats and stays.
        assert registry.count_of(other) == 1
        assert others_tab.parser.comments.count("keep-alive") >= 3
    finally:
        for connection in connections:
            connection.close()
        await browser.close_all()
        await server.stop()
