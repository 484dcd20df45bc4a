"""Where live events start: the read-back after a restart is not live, a re-created queue
resets the open streams, and a Last-Event-ID from the future gets a reset after a grace —
with real PostgreSQL, RabbitMQ and servers (a twistd process for the restart)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pika
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel

from tests.backends import PostgresServer, RabbitMQServer
from tests.browser import Browser, EventCollector
from tests.in_process_server import start_server
from tests.publishing import delete_queue, found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_subscriber
from tests.test_consumer import Broker, LogWatcher, logs  # noqa: F401 - logs is a fixture
from tests.test_health import fetch
from tests.test_no_event_lost import Instance, filenames, receive
from tests.waiting import bounded, wait_for

STREAM = {"x-queue-type": "stream", "x-max-age": "1D"}


def _publish_quickly(port: int, queue: str, bodies: list[bytes]) -> None:
    """Declare ``queue`` as a stream and publish ``bodies`` in order, with one confirm at
    the end (a broker handles a channel's messages in order): tens of thousands a second."""
    with pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port)) as connection:
        channel = connection.channel()
        channel.queue_declare(queue, durable=True, arguments=STREAM)
        for body in bodies[:-1]:
            channel.basic_publish("", queue, body)
        channel.confirm_delivery()
        channel.basic_publish("", queue, bodies[-1], mandatory=True)


async def readiness(browser: Browser, base_url: str) -> tuple[int, dict[str, Any]]:
    code, body = await fetch(browser, base_url + "/readyz")
    return code, json.loads(body)


async def states_until_ready(browser: Browser, base_url: str) -> list[str]:
    """Ask /readyz, as a load balancer does, until 200; return each RabbitMQ state seen."""
    states: list[str] = []
    deadline = reactor.seconds() + 30
    while True:
        code, body = await readiness(browser, base_url)
        states.append(body["dependencies"]["rabbitmq"]["state"])
        if code == 200:
            return states
        if reactor.seconds() > deadline:
            raise AssertionError(f"/readyz still answers {code}: {body!r}")
        await deferLater(reactor, 0.05, lambda: None)


def first_id(tab: EventCollector) -> str:
    """The first ``id:`` the stream sent, with or without an event."""
    for line in tab.raw.split(b"\n"):
        if line.startswith(b"id: "):
            return line[4:].decode()
    raise AssertionError(f"no id in {tab.raw[:200]!r}")


@pytest_twisted.ensureDeferred
async def test_a_restarted_instance_sends_its_read_back_only_to_streams_resuming_with_an_id(
    tmp_path: Path,
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
) -> None:
    """The issue's reproduction: 30,000 messages (40 for the user) before start; a page
    without Last-Event-ID opened as soon as the server can check it gets none of them."""
    queue = tls_environ["SSE_RABBITMQ_QUEUE_NAME"]
    userid, token = add_subscriber(postgres_tls)
    someone_else = new_uuid()
    total, every = 30_000, 750
    bodies = [
        json.dumps(found_contract(userid if n % every == 0 else someone_else, filename=str(n)))
        for n in range(total)
    ]
    await bounded(
        deferToThread(
            _publish_quickly, rabbitmq_tls.amqp_port, queue, [body.encode() for body in bodies]
        ),
        60,
    )
    instance = Instance({**tls_environ, "SSE_LOGS_DIR": ""}, tmp_path)
    try:
        instance.port = await bounded(instance.process.port)
        # As soon as it can check a subscriber (before, a browser is asked to come back).
        await wait_for(
            lambda: any(
                line["message"].startswith("connected to PostgreSQL")
                for line in instance.process.lines
            ),
            "a PostgreSQL connection",
        )
        base_url = f"https://localhost:{instance.port}"
        url = instance.url(new_uuid(), userid, token)
        _, fresh = await browser.open(url)
        # The browser had the user's first 20 events (offsets are 0, 750, ...).
        _, resumed = await browser.open(url, last_event_id=str(19 * every))
        code, body = await readiness(browser, base_url)
        assert code == 503, "the resumed stream opened during the read-back"
        asked_at = reactor.seconds()
        states = await states_until_ready(browser, base_url)
        assert "reading back" in [body["dependencies"]["rabbitmq"]["state"], *states]
        not_ready_for = reactor.seconds() - asked_at

        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid, filename="live"))
        await receive(resumed, 21)
        await receive(fresh, 1)
        assert filenames(fresh) == ["live"]
        assert first_id(fresh) == str(total - 1), "the tail, not the middle of the read-back"
        assert filenames(resumed) == [str(n * every) for n in range(20, 40)] + ["live"]
        assert [event["event"] for event in resumed.received] == ["message"] * 21
        assert resumed.received[-1]["id"] == fresh.received[-1]["id"] == str(total)
        print(
            f"read-back of {total} messages: /readyz 503 for {not_ready_for:.2f} s more after"
            f" the resume; new page got {len(filenames(fresh)) - 1} old events, first id"
            f" {first_id(fresh)}; resumed page got {len(filenames(resumed)) - 1} missed events"
        )
    finally:
        await instance.kill(2)


@pytest_twisted.ensureDeferred
async def test_a_queue_deleted_while_consumed_resets_open_streams_and_loses_nothing_new(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
    logs: LogWatcher,  # noqa: F811 - the fixture
) -> None:
    server = await start_server(tls_environ)
    queue = server.config.rabbitmq_queue_name
    try:
        userid, token = add_subscriber(postgres_tls)
        url = server.subscribe_url(new_uuid(), userid, token)
        await states_until_ready(browser, server.base_url)
        _, tab = await browser.open(url)
        old = [f"old {n}" for n in range(3)]
        await publish(
            rabbitmq_tls.amqp_port, queue, *(found_contract(userid, filename=name) for name in old)
        )
        await receive(tab, 3)

        await deferToThread(delete_queue, rabbitmq_tls.amqp_port, queue)
        [line] = await logs.wait_for("is a new stream")
        # Publishing to a stream still being created can fail: wait until it is consumed.
        await wait_for(lambda: server.service.consumer.consuming, "consuming the new stream")
        new = [f"new {n}" for n in range(5)]
        await publish(
            rabbitmq_tls.amqp_port, queue, *(found_contract(userid, filename=name) for name in new)
        )
        await receive(tab, 3 + 1 + 5)
        await states_until_ready(browser, server.base_url)

        reset = tab.received[3]
        assert reset["event"] == "reset"
        assert json.loads(reset["data"]) == {"lastEventId": "2", "resumeFrom": 0}
        assert reset["id"] == "-1"
        assert filenames(tab) == old + new
        assert [event["id"] for event in tab.received[4:]] == ["0", "1", "2", "3", "4"]
        errors = [event for event in logs.events if event.get("log_level") == LogLevel.error]
        assert len(errors) == 1
        assert f"{queue} no longer exists" in line
        # A browser that reconnects with the reset's id gets the new stream, no second reset.
        _, again = await browser.open(url, last_event_id="-1")
        await receive(again, 5)
        assert filenames(again) == new
        assert [event["event"] for event in again.received] == ["message"] * 5
    finally:
        await server.stop()


@pytest.mark.parametrize("published_while_away", [1, 5], ids=["shorter", "longer"])
@pytest_twisted.ensureDeferred
async def test_a_queue_recreated_while_disconnected_is_noticed_on_return(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
    logs: LogWatcher,  # noqa: F811 - the fixture
    published_while_away: int,
) -> None:
    """Back on a new stream shorter than the old position, the first message published
    tells; on a longer one, the message at the old position is another."""
    server = await start_server(tls_environ)
    queue = server.config.rabbitmq_queue_name
    broker = Broker(rabbitmq_tls.amqp_port)
    consumer = server.service.consumer
    try:
        userid, token = add_subscriber(postgres_tls)
        await states_until_ready(browser, server.base_url)
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        old = [f"old {n}" for n in range(3)]
        await publish(
            rabbitmq_tls.amqp_port, queue, *(found_contract(userid, filename=name) for name in old)
        )
        await receive(tab, 3)

        await consumer.stopService()
        await deferToThread(delete_queue, rabbitmq_tls.amqp_port, queue)
        await deferToThread(broker.declare, queue, STREAM)
        new = [f"new {n}" for n in range(published_while_away + 1)]
        away = [found_contract(userid, filename=name) for name in new[:-1]]
        await publish(rabbitmq_tls.amqp_port, queue, *away)
        consumer.startService()
        await wait_for(lambda: consumer.consuming, "consuming again")
        if published_while_away < 3:
            code, body = await readiness(browser, server.base_url)
            assert code == 503, "nothing tells yet whether this is the same stream"
            assert body["dependencies"]["rabbitmq"]["state"] in (
                "checking its position after reconnecting",
                "reading back",
            )
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid, filename=new[-1]))
        await receive(tab, 3 + 1 + len(new))
        await states_until_ready(browser, server.base_url)

        assert [event["event"] for event in tab.received] == ["message"] * 3 + ["reset"] + [
            "message"
        ] * len(new)
        assert filenames(tab) == old + new
        assert len(logs.lines("is a new stream")) == 1
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_id_far_past_the_stream_gets_a_reset_after_the_grace_then_live_events(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
) -> None:
    grace = 0.5
    server = await start_server({**tls_environ, "SSE_FUTURE_ID_GRACE_SECONDS": str(grace)})
    queue = server.config.rabbitmq_queue_name
    try:
        userid, token = add_subscriber(postgres_tls)
        url = server.subscribe_url(new_uuid(), userid, token)
        await states_until_ready(browser, server.base_url)
        await publish(
            rabbitmq_tls.amqp_port,
            queue,
            found_contract(userid, filename="0"),
            found_contract(userid),
        )
        await wait_for(lambda: server.service.consumer.last_offset == 1, "consumed")
        opened_at = reactor.seconds()
        _, tab = await browser.open(url, last_event_id="1000000")
        reset = await tab.next_event()
        waited = reactor.seconds() - opened_at
        assert reset["event"] == "reset"
        assert json.loads(reset["data"]) == {"lastEventId": "1000000", "resumeFrom": 2}
        assert reset["id"] == "1"
        assert grace <= waited < grace + 5
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid, filename="live"))
        live = await tab.next_event()
        assert (live["event"], live["id"]) == ("message", "2")
        assert filenames(tab) == ["live"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_id_just_ahead_of_this_instance_waits_for_it_without_reset_or_repeat(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
) -> None:
    """The browser comes from an instance a little ahead: this one catches up within the
    grace, and sends only what follows the id."""
    grace = 3.0
    server = await start_server({**tls_environ, "SSE_FUTURE_ID_GRACE_SECONDS": str(grace)})
    queue = server.config.rabbitmq_queue_name
    consumer = server.service.consumer
    try:
        userid, token = add_subscriber(postgres_tls)
        url = server.subscribe_url(new_uuid(), userid, token)
        await states_until_ready(browser, server.base_url)
        await publish(
            rabbitmq_tls.amqp_port,
            queue,
            *(found_contract(userid, filename=str(n)) for n in range(2)),
        )
        await wait_for(lambda: consumer.last_offset == 1, "consumed")
        # Held back, this instance has not consumed what the browser already has.
        await consumer.stopService()
        await publish(
            rabbitmq_tls.amqp_port,
            queue,
            *(found_contract(userid, filename=str(n)) for n in (2, 3, 4)),
        )
        opened_at = reactor.seconds()
        _, tab = await browser.open(url, last_event_id="3")
        consumer.startService()
        await receive(tab, 1)
        # Absence of a reset can only be seen once the grace is over.
        await wait_for(lambda: reactor.seconds() > opened_at + grace + 0.5, "the grace")
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid, filename="5"))
        await receive(tab, 2)
        assert [event["event"] for event in tab.received] == ["message", "message"]
        assert filenames(tab) == ["4", "5"]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_an_idle_instance_knows_its_window_at_start_and_a_late_browser_gets_reset_first(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
) -> None:
    """The stream's messages are all older than the window and nothing is published after
    the start: a browser behind the newest offset gets `reset` as its first event at once,
    one at it gets no reset, one past it gets `reset` after the grace."""
    queue = tls_environ["SSE_RABBITMQ_QUEUE_NAME"]
    userid, token = add_subscriber(postgres_tls)
    bodies = [json.dumps(found_contract(userid, filename=str(n))).encode() for n in range(10)]
    await deferToThread(_publish_quickly, rabbitmq_tls.amqp_port, queue, bodies)
    # Older than a window of 1 s (which starts at a whole second, so up to 2 s back).
    await deferLater(reactor, 2.5, lambda: None)
    server = await start_server(
        {**tls_environ, "SSE_REPLAY_SECONDS": "1", "SSE_FUTURE_ID_GRACE_SECONDS": "0.5"}
    )
    try:
        await states_until_ready(browser, server.base_url)
        url = server.subscribe_url(new_uuid(), userid, token)
        _, behind = await browser.open(url, last_event_id="3")
        _, current = await browser.open(url, last_event_id="9")
        _, ahead = await browser.open(url, last_event_id="50")
        for tab, requested in ((behind, "3"), (ahead, "50")):
            reset = await tab.next_event()
            assert reset["event"] == "reset"
            assert json.loads(reset["data"]) == {"lastEventId": requested, "resumeFrom": 10}
            assert reset["id"] == "9"
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid, filename="live"))
        for tab, before in ((behind, 1), (current, 0), (ahead, 1)):
            await receive(tab, before + 1)
            assert [(event["event"], event["id"]) for event in tab.received[before:]] == [
                ("message", "10")
            ]
    finally:
        await server.stop()
