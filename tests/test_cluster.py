"""The engines as clusters: a three-node RabbitMQ cluster losing (shut down or crashed) the
node the consumer reads from while messages flow, and a PostgreSQL primary with its
streaming-replication standby losing the primary, or lagging behind a revocation.

Select with ``-k cluster``. Every server runs from the installed binaries on free ports,
over TLS as in production; each is stopped, and its files deleted, at the end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from typing import Any

import pika
import pika.exceptions
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent

from tests.backends import Pki, PostgresServer, RabbitMQCluster, RabbitMQServer
from tests.browser import Browser, EventCollector
from tests.in_process_server import start_server
from tests.logs import lines_with
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_subscriber
from tests.waiting import bounded, wait_for

USERS = 3
TABS_PER_USER = 2
MESSAGES_PER_USER = 60
CHUNK = 10
PACE_SECONDS = 0.02
# Long enough for a node to stop, the consumer to notice and resume on another.
FAILOVER_SECONDS = 60


@pytest.fixture
def rabbitmq_cluster(pki: Pki) -> Iterator[RabbitMQCluster]:
    """Three RabbitMQ nodes joined into one cluster; stopped and deleted afterwards."""
    cluster = RabbitMQCluster.launch(pki, size=3)
    try:
        yield cluster
    finally:
        cluster.destroy()


def order(filename: str) -> int:
    return MESSAGES_PER_USER if filename == "last" else int(filename)


def received(tab: EventCollector) -> list[tuple[str, str]]:
    """(id, filename) of each message event, in the order the tab received them."""
    return [
        (event["id"], json.loads(event["data"])["filename"])
        for event in tab.received
        if event["event"] == "message"
    ]


def filenames(tab: EventCollector) -> list[str]:
    return [
        json.loads(event["data"])["filename"]
        for event in tab.received
        if event["event"] == "message"
    ]


def consuming_addresses(events: Sequence[LogEvent]) -> list[str]:
    """The node of each "consuming ... at <node>" line, in order."""
    return [
        event["address"]
        for event in events
        if event.get("log_format", "").startswith("consuming {queue} at {address}")
    ]


def publish_through_failover(port: int, queue: str, messages: list[dict[str, Any]]) -> None:
    """Publish each message with a confirm, paced so that the flow goes on while a node
    stops; a message the broker fails (its stream's leader lost) is sent again on a new
    connection, as a producer with retries does: it may then be in the stream twice."""
    channel: Any = None
    for message in messages:
        body = json.dumps(message).encode()
        deadline = time.monotonic() + FAILOVER_SECONDS
        while True:
            try:
                if channel is None:
                    connection = pika.BlockingConnection(
                        pika.ConnectionParameters("127.0.0.1", port)
                    )
                    channel = connection.channel()
                    channel.confirm_delivery()
                channel.basic_publish("", queue, body, mandatory=True)
                break
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                with suppress(pika.exceptions.AMQPError):
                    connection.close()
                channel = None
                time.sleep(0.2)
        time.sleep(PACE_SECONDS)
    with suppress(pika.exceptions.AMQPError):
        connection.close()


def stream_contents(port: int, queue: str, markers: int) -> list[tuple[int, dict[str, Any]]]:
    """Every message in the stream with its offset, read from the first: the truth each
    open stream must match. The end is a quiet second once ``markers`` "last" messages
    (published after all others) have been read."""
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=100)
        contents: list[tuple[int, dict[str, Any]]] = []
        deadline = time.monotonic() + FAILOVER_SECONDS
        arriving = channel.consume(
            queue, arguments={"x-stream-offset": "first"}, inactivity_timeout=1
        )
        for method, properties, body in arriving:
            if method is None:
                seen = sum(message["filename"] == "last" for _, message in contents)
                if seen >= markers:
                    return contents
                assert time.monotonic() < deadline, "the stream never held every marker"
                continue
            contents.append((properties.headers["x-stream-offset"], json.loads(body)))
            channel.basic_ack(method.delivery_tag)
        raise AssertionError("the stream consumer ended")
    finally:
        # Not cancelled first: a stream answers the reject of what is in flight by closing.
        connection.close()


@pytest.mark.parametrize("stop", ["terminate", "kill"], ids=["shut-down", "crash"])
@pytest_twisted.ensureDeferred
async def test_cluster_losing_the_consumers_node_mid_flow_loses_and_repeats_nothing(
    stop: str,
    pki: Pki,
    postgres_tls: PostgresServer,
    rabbitmq_cluster: RabbitMQCluster,
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    nodes = rabbitmq_cluster.nodes
    queue = f"messages-{new_uuid()}"
    environ = {
        "SSE_CERTS_DIR": str(pki.directory),
        **postgres_tls.settings(),
        # Every node over TLS, each verified against the name it is listed by.
        "SSE_RABBITMQ_HOST": ",".join(f"{node.host}:{node.amqps_port}" for node in nodes),
        "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "3",
        "SSE_RABBITMQ_QUEUE_NAME": queue,
    }
    server = await start_server(environ)
    try:
        [first_address] = consuming_addresses(log_events)
        victim = next(node for node in nodes if first_address.endswith(f":{node.amqps_port}"))
        survivor: RabbitMQServer = next(node for node in nodes if node is not victim)
        listing = await deferToThread(
            survivor.rabbitmqctl,
            *("list_queues", "--quiet", "--no-table-headers", "arguments", "members"),
        )
        arguments, members = listing.strip().split("\t")
        assert '{"x-initial-cluster-size",3}' in arguments
        assert sorted(members.strip("[]").split(", ")) == sorted(node.nodename for node in nodes)

        tabs: dict[str, list[EventCollector]] = {}
        for _ in range(USERS):
            userid, token = add_subscriber(postgres_tls)
            url = server.subscribe_url(new_uuid(), userid, token)
            tabs[userid] = [(await browser.open(url))[1] for _ in range(TABS_PER_USER)]
        messages = [
            found_contract(userid, filename=str(number))
            for number in range(MESSAGES_PER_USER)
            for userid in tabs
        ]
        every_tab = [tab for user_tabs in tabs.values() for tab in user_tabs]

        port = survivor.amqp_port
        await deferToThread(publish_through_failover, port, queue, messages[:CHUNK])
        await wait_for(lambda: all(filenames(tab) for tab in every_tab), "the first events")
        # The node stops (a clean shut-down, or SIGKILL) while more are published; the rest
        # follow once it is down.
        half = len(messages) // 2
        stopping = deferToThread(getattr(victim, stop))
        await deferToThread(publish_through_failover, port, queue, messages[CHUNK:half])
        await stopping
        await deferToThread(publish_through_failover, port, queue, messages[half:])
        markers = [found_contract(userid, filename="last") for userid in tabs]
        await deferToThread(publish_through_failover, port, queue, markers)
        contents = await deferToThread(stream_contents, port, queue, len(markers))
        expected = {
            userid: [
                (str(offset), message["filename"])
                for offset, message in contents
                if message["userid"] == userid
            ]
            for userid in tabs
        }
        await wait_for(
            lambda: all(
                received(tab) == expected[userid] for userid in tabs for tab in tabs[userid]
            ),
            "every message of the stream on every tab after the failover",
            FAILOVER_SECONDS,
        )
        await deferLater(reactor, 1, lambda: None)  # room for a repeat to show up
        addresses = consuming_addresses(log_events)
    finally:
        await server.stop()

    assert addresses[0] == first_address and len(addresses) >= 2
    assert not addresses[-1].endswith(f":{victim.amqps_port}"), "resumed on another node"
    for userid, user_tabs in tabs.items():
        # Every message published (a retried one perhaps twice, at two offsets) ...
        assert sorted({filename for _, filename in expected[userid]}, key=order) == [
            str(number) for number in range(MESSAGES_PER_USER)
        ] + ["last"]
        # ... and on each tab every offset of the stream for its user, in order, once.
        for tab in user_tabs:
            assert received(tab) == expected[userid]


@pytest.fixture
def primary_and_standby(pki: Pki) -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A PostgreSQL primary and its hot standby (streaming replication), both over TLS;
    stopped and deleted afterwards."""
    primary = PostgresServer.launch(pki)
    try:
        standby = PostgresServer.launch_standby(pki, primary)
        try:
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()


async def replicated_subscriber(
    primary: PostgresServer, standby: PostgresServer
) -> tuple[str, str]:
    """A subscriber added on the primary, once the standby has it too."""
    userid, token = add_subscriber(primary)
    query = "SELECT 1 FROM users WHERE uuid = %s"
    await wait_for_rows(
        standby, query, (userid,), [(1,)], "the standby never received the subscriber"
    )
    return userid, token


def postgres_connections(events: Sequence[LogEvent]) -> list[str]:
    """Each "connected to PostgreSQL host:port/db" line."""
    return [
        formatEvent(event)
        for event in events
        if event.get("log_format", "").startswith("connected to PostgreSQL")
    ]


async def event_or_end(tab: EventCollector) -> None:
    await wait_for(lambda: bool(filenames(tab)) or tab.closed.called, "an event or an end")


async def let_in(browser: Browser, url: str, publish_to: str, userid: str) -> int:
    """Subscribe until the server lets the subscriber in, as an EventSource does; return
    how many answers it took. Every answer must be a 200 (a browser stops on any other);
    one that ends at once is the "come back later" of a database outage."""
    for attempt in range(1, 20):
        response, tab = await browser.open(url)
        assert response.code == 200
        await publish(5672, publish_to, found_contract(userid, filename=f"attempt {attempt}"))
        await event_or_end(tab)
        if filenames(tab):
            tab.close()
            return attempt
        await deferLater(reactor, 0.5, lambda: None)  # the retry: hint's wait
    raise AssertionError("never let in")


def listing_both(
    environ: dict[str, str],
    primary: PostgresServer,
    standby: PostgresServer,
    standby_first: bool,
    **settings: str,
) -> dict[str, str]:
    """``environ`` listing both PostgreSQL hosts, the primary as ``localhost`` and the
    standby as ``127.0.0.1`` (verify-full checks each against its own name), every
    subscribe asking the database (no cache)."""
    hosts = [("localhost", primary), ("127.0.0.1", standby)]
    if standby_first:
        hosts.reverse()
    return {
        **environ,
        "SSE_POSTGRES_HOST": ",".join(name for name, _ in hosts),
        "SSE_POSTGRES_PORT": ",".join(str(server.port) for _, server in hosts),
        "SSE_POSTGRES_SSLMODE": "verify-full",
        "SSE_POSTGRES_USERNAME": primary.user,
        "SSE_POSTGRES_DB_NAME": primary.database,
        "SSE_AUTH_CACHE_SECONDS": "0",
        **settings,
    }


@pytest_twisted.ensureDeferred
async def test_cluster_of_postgres_hosts_losing_the_primary_still_lets_subscribers_in(
    plaintext_environ: dict[str, str],
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    primary, standby = primary_and_standby
    userid, token = await replicated_subscriber(primary, standby)
    environ = listing_both(
        plaintext_environ, primary, standby, standby_first=False, SSE_POSTGRES_TIMEOUT_SECONDS="2"
    )
    queue = environ["SSE_RABBITMQ_QUEUE_NAME"]
    server = await start_server(environ)
    try:
        url = server.subscribe_url(new_uuid(), userid, token)
        assert await let_in(browser, url, queue, userid) == 1
        await deferToThread(primary.stop)
        attempts = await let_in(browser, url, queue, userid)
    finally:
        await server.stop()
    connected = postgres_connections(log_events)
    assert f"connected to PostgreSQL localhost:{primary.port}/sse" in connected
    assert f"connected to PostgreSQL 127.0.0.1:{standby.port}/sse" in connected
    # At most the one "come back later" a database outage gets, then let in.
    assert attempts <= 2


@pytest_twisted.ensureDeferred
async def test_cluster_of_postgres_hosts_the_revocation_listener_passes_a_standby_listed_first(
    plaintext_environ: dict[str, str],
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    primary, standby = primary_and_standby
    userid, token = await replicated_subscriber(primary, standby)
    environ = listing_both(
        plaintext_environ, primary, standby, standby_first=True, SSE_POSTGRES_POOL_SIZE="2"
    )
    server = await start_server(environ)
    try:
        listener = server.service.getServiceNamed("revocations")
        await wait_for(lambda: listener.listening, "LISTEN on the primary")
        url = server.subscribe_url(new_uuid(), userid, token)
        queue = environ["SSE_RABBITMQ_QUEUE_NAME"]
        assert await let_in(browser, url, queue, userid) == 1
    finally:
        await server.stop()
    # The pool reads from the standby, listed first; LISTEN, refused there, is on the primary.
    assert sorted(postgres_connections(log_events)) == [
        f"connected to PostgreSQL 127.0.0.1:{standby.port}/sse",
        f"connected to PostgreSQL 127.0.0.1:{standby.port}/sse",
        f"connected to PostgreSQL localhost:{primary.port}/sse",
    ]


async def replay_paused(standby: PostgresServer) -> None:
    """Pause the standby's replay, and wait until it has: until resumed, it answers with
    what it had replayed, whatever the primary commits meanwhile."""
    await deferToThread(standby.execute, "SELECT pg_wal_replay_pause()")
    query = "SELECT pg_get_wal_replay_pause_state()"
    await wait_for_rows(standby, query, (), [("paused",)], "the standby's replay to pause")


async def wait_for_rows(
    server: PostgresServer, query: str, params: tuple[Any, ...], rows: list[Any], what: str
) -> None:
    deadline = reactor.seconds() + 20
    while await deferToThread(server.execute, query, params) != rows:
        assert reactor.seconds() < deadline, what
        await deferLater(reactor, 0.1, lambda: None)


async def open_tab(browser: Browser, url: str) -> EventCollector:
    """A stream, once the server has it open."""
    response, tab = await browser.open(url)
    assert response.code == 200
    await wait_for(lambda: "connected" in tab.parser.comments, "the stream to open")
    return tab


@pytest_twisted.ensureDeferred
async def test_cluster_of_postgres_hosts_a_revocation_closes_the_stream_while_the_standby_lags(
    plaintext_environ: dict[str, str],
    primary_and_standby: tuple[PostgresServer, PostgresServer],
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    primary, standby = primary_and_standby
    alice, alice_token = await replicated_subscriber(primary, standby)
    bob, bob_token = await replicated_subscriber(primary, standby)
    # The standby first: the subscriber checks read from it.
    environ = listing_both(
        plaintext_environ, primary, standby, standby_first=True, SSE_POSTGRES_POOL_SIZE="2"
    )
    queue = environ["SSE_RABBITMQ_QUEUE_NAME"]
    server = await start_server(environ)
    try:
        listener = server.service.getServiceNamed("revocations")
        await wait_for(lambda: listener.listening, "LISTEN on the primary")
        alices_tab = await open_tab(browser, server.subscribe_url(new_uuid(), alice, alice_token))
        bobs_tab = await open_tab(browser, server.subscribe_url(new_uuid(), bob, bob_token))
        await replay_paused(standby)
        try:
            await deferToThread(primary.execute, "DELETE FROM users WHERE uuid = %s", (alice,))
            await bounded(alices_tab.closed, 10)
            # The standby still has Alice's row: the re-check did not read it there.
            still_there = "SELECT count(*) FROM users WHERE uuid = %s"
            assert await deferToThread(standby.execute, still_there, (alice,)) == [(1,)]
            assert not bobs_tab.closed.called
            await publish(5672, queue, found_contract(bob, filename="still open"))
            await wait_for(lambda: filenames(bobs_tab) == ["still open"], "Bob's next event")
        finally:
            await deferToThread(standby.execute, "SELECT pg_wal_replay_resume()")
    finally:
        await server.stop()
    assert lines_with(log_events, "access revoked") == [
        f"access revoked for {alice}: 1 open streams closed"
    ]
