"""The maximum stream lifetime: streams end spread over the last tenth of it, with a jittered
retry, and a browser that resumes with its Last-Event-ID loses nothing.

End to end on a server in this process and the test PostgreSQL and RabbitMQ servers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._lifetime import StreamLifetimeService, stream_lifetime
from sse_twisted._replay import ReplayWindow
from sse_twisted._streams import EventStream, StreamRegistry
from tests.backends import PostgresServer, RabbitMQServer
from tests.browser import Browser, EventCollector
from tests.in_process_server import RunningServer, start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_subscriber
from tests.waiting import bounded, wait_for

USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
RETRY_MILLISECONDS = 300
JITTER_MILLISECONDS = 400


# --- unit level, on a Clock ---


def lifetimes(clock: Clock, window: ReplayWindow | None = None) -> tuple[StreamRegistry, Any]:
    registry = StreamRegistry()
    kept = window if window is not None else ReplayWindow(clock, 300, 1000)
    service = StreamLifetimeService(
        registry,
        lambda _userid: kept,
        clock,
        RETRY_MILLISECONDS,
        JITTER_MILLISECONDS,
    )
    service.startService()
    return registry, service


def open_stream(
    registry: StreamRegistry, clock: Clock, max_seconds: float, resume_after: int = -1
) -> EventStream:
    request = DummyRequest([b""])
    stream = EventStream(
        USERID,
        new_uuid(),
        request,
        "c",
        max_unsent_bytes=1000,
        resume_after=resume_after,
        expires_at=clock.seconds() + stream_lifetime(max_seconds),
    )
    registry.add(stream)

    def ended(_: object) -> None:
        # As the resource does: a finished request ends the stream and leaves the registry.
        stream.response_ended()
        registry.remove(stream)

    request.notifyFinish().addBoth(ended)
    return stream


def written(stream: EventStream) -> bytes:
    return b"".join(stream.request.written)  # type: ignore[attr-defined]


def retry_of(stream: EventStream) -> int:
    [line] = [line for line in written(stream).split(b"\n") if line.startswith(b"retry: ")]
    return int(line.removeprefix(b"retry: "))


def test_streams_opened_together_expire_spread_over_the_last_tenth_with_jittered_retries() -> None:
    clock = Clock()
    registry, service = lifetimes(clock)
    streams = [open_stream(registry, clock, max_seconds=100) for _ in range(500)]
    closed_at: dict[int, int] = {}
    for second in range(1, 102):
        clock.advance(1)
        closed = sum(1 for stream in streams if stream.request.finished) - sum(closed_at.values())
        if closed:
            closed_at[second] = closed
    service.stopService()
    assert len(registry) == 0 and sum(closed_at.values()) == 500
    assert min(closed_at) >= 90 and max(closed_at) <= 100
    assert max(closed_at.values()) < 100  # about 50 a second, never all at once
    retries = [retry_of(stream) for stream in streams]
    assert all(
        RETRY_MILLISECONDS <= retry <= RETRY_MILLISECONDS + JITTER_MILLISECONDS for retry in retries
    )
    assert len(set(retries)) > 100


def test_an_expiring_stream_is_given_the_newest_id_unless_it_is_already_ahead() -> None:
    clock = Clock()
    window = ReplayWindow(clock, 300, 1000)
    registry, service = lifetimes(clock, window)
    behind = open_stream(registry, clock, max_seconds=10)
    ahead = open_stream(registry, clock, max_seconds=10, resume_after=50)
    window.consumed(41)  # someone else's event, while both were open
    clock.advance(11)
    service.stopService()
    assert written(behind).startswith(b"id: 41\n\nretry: ")
    assert written(ahead).startswith(b"retry: ")


def test_a_stream_expiring_with_replay_still_unsent_keeps_the_id_of_what_it_got() -> None:
    clock = Clock()
    window = ReplayWindow(clock, 300, 1000)
    registry, service = lifetimes(clock, window)
    stream = open_stream(registry, clock, max_seconds=10)
    stream.pauseProducing()  # the client stopped reading: its replay waits
    stream.send_first([b"id: 7\ndata: {}\n\n"])
    window.consumed(41)
    clock.advance(11)
    service.stopService()
    # An id of 41 would make the browser skip event 7, which it never got.
    assert b"id: 41" not in written(stream)
    assert b"id: 7" not in written(stream)
    assert written(stream).startswith(b"retry: ")


def test_a_stream_closed_before_its_expiry_is_forgotten() -> None:
    clock = Clock()
    registry, service = lifetimes(clock)
    stream = open_stream(registry, clock, max_seconds=10)
    stream.close()
    assert registry.take_expired(clock.seconds() + 11) == []
    service.stopService()


# --- end to end: a server in this process, the test PostgreSQL and RabbitMQ servers ---


@pytest_twisted.async_yield_fixture
async def short_lived(tls_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    """A server whose streams live about 2 s."""
    running = await start_server(
        {
            **tls_environ,
            "SSE_MAX_STREAM_SECONDS": "2",
            "SSE_RETRY_MILLISECONDS": str(RETRY_MILLISECONDS),
            "SSE_RECONNECT_JITTER_MILLISECONDS": str(JITTER_MILLISECONDS),
        }
    )
    yield running
    await running.stop()


async def resume(browser: Browser, url: str, closed: EventCollector) -> EventCollector:
    """Reconnect as EventSource does: after the retry delay, with the last event id."""
    assert closed.parser.retry is not None and closed.parser.last_event_id != ""
    await deferLater(reactor, closed.parser.retry / 1000, lambda: None)
    response, tab = await browser.open(url, last_event_id=closed.parser.last_event_id)
    assert response.code == 200
    return tab


def sequence(events: list[dict[str, str]]) -> list[int]:
    return [json.loads(event["data"])["seq"] for event in events]


@pytest_twisted.ensureDeferred
async def test_an_expired_stream_closes_with_a_jittered_retry_and_its_resume_loses_nothing(
    short_lived: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    queue = short_lived.config.rabbitmq_queue_name
    alice, alice_token = add_subscriber(postgres_tls)
    bob, bob_token = add_subscriber(postgres_tls)
    url = short_lived.subscribe_url(new_uuid(), alice, alice_token)
    opened_at = reactor.seconds()
    tabs = [(await browser.open(url))[1] for _ in range(4)]
    _, bobs_tab = await browser.open(short_lived.subscribe_url(new_uuid(), bob, bob_token))
    # An event for someone else while Alice's streams are open: hers get none before
    # they expire, yet must resume after it.
    await publish(rabbitmq_tls.amqp_port, queue, found_contract(bob, seq=-1))
    bobs_event = await bobs_tab.next_event()

    for tab in tabs:
        await bounded(tab.closed, 5)
    assert reactor.seconds() - opened_at >= 0.9 * 2
    assert [tab.received for tab in tabs] == [[]] * 4
    assert {tab.parser.last_event_id for tab in tabs} == {bobs_event["id"]}
    retries = [tab.parser.retry for tab in tabs]
    assert all(
        retry is not None
        and RETRY_MILLISECONDS <= retry <= RETRY_MILLISECONDS + JITTER_MILLISECONDS
        for retry in retries
    ), retries
    assert len(set(retries)) > 1, retries

    # Published while no stream of Alice is open, then after she is back.
    await publish(
        rabbitmq_tls.amqp_port, queue, *(found_contract(alice, seq=seq) for seq in range(5))
    )
    resumed = await resume(browser, url, tabs[0])
    await publish(
        rabbitmq_tls.amqp_port, queue, *(found_contract(alice, seq=seq) for seq in range(5, 10))
    )
    got = [await resumed.next_event() for _ in range(10)]
    assert sequence(got) == list(range(10))


@pytest_twisted.ensureDeferred
async def test_events_published_all_through_an_expiry_arrive_once_each(
    short_lived: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    queue = short_lived.config.rabbitmq_queue_name
    alice, token = add_subscriber(postgres_tls)
    url = short_lived.subscribe_url(new_uuid(), alice, token)
    _, first = await browser.open(url)
    tabs = [first]
    done = False

    async def browse() -> None:
        # EventSource: after every end, back with the last event id it saw.
        last_event_id = ""
        while True:
            closed = tabs[-1]
            await closed.closed
            if done:
                return
            last_event_id = closed.parser.last_event_id or last_event_id
            assert closed.parser.retry is not None and last_event_id != ""
            await deferLater(reactor, closed.parser.retry / 1000, lambda: None)
            response, tab = await browser.open(url, last_event_id=last_event_id)
            assert response.code == 200
            tabs.append(tab)

    browsing = Deferred.fromCoroutine(browse())
    published = 0

    async def publish_next() -> None:
        nonlocal published
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(alice, seq=published))
        published += 1

    # One message at a time, from before the first expiry until 5 after the reconnection.
    deadline = reactor.seconds() + 10
    while len(tabs) < 2:
        assert reactor.seconds() < deadline, "the stream did not expire"
        await publish_next()
    for _ in range(5):
        await publish_next()
    await wait_for(lambda: sum(len(tab.received) for tab in tabs) >= published, "every event")
    done = True
    assert not browsing.called, browsing  # no failed assertion in the browser
    assert len(first.received) > 0  # some arrived before the expiry, some after
    assert sequence([event for tab in tabs for event in tab.received]) == list(range(published))
