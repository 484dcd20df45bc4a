"""Partitioned mode: users hashed to partitions, ids that carry the layout, the super stream
layout declared (or refused) on the machine's RabbitMQ, an instance consuming only its
partitions, and a subscribe routed to the wrong shard asked to come back."""

from __future__ import annotations

import json
import subprocess
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2
import pytest
import pytest_twisted
from twisted.application.service import Service
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted import publish as publish_tool
from sse_twisted._config import ConfigError, load_config
from sse_twisted._health import ConsumerCheck
from sse_twisted._lifetime import StreamLifetimeService
from sse_twisted._live import LiveStart
from sse_twisted._metrics import Metrics
from sse_twisted._partitions import SINGLE, Partition, partition_of
from sse_twisted._replay import ReplayWindow
from sse_twisted._router import MessageRouter
from sse_twisted._shard import PartitionedConsumer
from sse_twisted._streams import EventStream, StreamRegistry
from tests.browser import Browser
from tests.in_process_server import RunningServer, start_server
from tests.logs import warnings_logged
from tests.publishing import delete_super_stream, found_contract
from tests.secrets_tracking import new_token, new_uuid
from tests.waiting import bounded, wait_for

PARTITIONS = 4


def user_in(partition: int, partitions: int = PARTITIONS) -> str:
    """A random v4 UUID that lives in ``partition``."""
    while True:
        userid = new_uuid()
        if partition_of(userid, partitions) == partition:
            return userid


# --- the hash and the ids, in memory ---


def test_a_users_partition_is_the_ieee_crc32_of_its_lowercase_userid_modulo_p() -> None:
    assert zlib.crc32(b"123456789") == 0xCBF43926  # the CRC-32/ISO-HDLC check value
    userid = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
    assert partition_of(userid, 7) == zlib.crc32(userid.encode()) % 7
    assert partition_of(userid.upper(), 7) == partition_of(userid, 7)
    counts = [0] * PARTITIONS
    for _ in range(4000):
        counts[partition_of(str(uuid.uuid4()), PARTITIONS)] += 1
    assert min(counts) > 800  # spread: about 1,000 each


def test_one_partition_keeps_plain_offsets_as_event_ids() -> None:
    assert SINGLE.event_id(17) == 17
    assert SINGLE.offset_of("17") == 17
    assert SINGLE.offset_of("-1") == -1
    assert SINGLE.offset_of("4-2-17") is None
    assert SINGLE.queue("messages") == "messages"


def test_a_partitions_ids_carry_the_layout_and_other_layouts_ids_are_no_offset() -> None:
    partition = Partition(4, 2)
    assert partition.event_id(1187) == "4-2-1187"
    assert partition.offset_of("4-2-1187") == 1187
    assert partition.offset_of("4-2--1") == -1
    assert partition.queue("messages") == "messages-2"
    for other in ("1187", "-1", "8-2-1187", "4-1-1187", "4-2-", "4-2-x", "4-2-1187-1", " 4-2-1"):
        assert partition.offset_of(other) is None, other
    assert partition.offset_of("4-2-" + "9" * 20) is None


def test_a_resume_with_an_id_of_another_layout_gets_a_reset_in_this_layout() -> None:
    clock = Clock()
    partition = Partition(4, 2)
    window = ReplayWindow(clock, 300, 100, partition=partition)
    userid = user_in(2)
    for offset in range(5, 8):
        window.record(userid, None, offset, f"event {offset}".encode())
    resumed = window.replay(userid, new_uuid(), "4-2-6")
    assert resumed.frames == [b"event 7"]
    for foreign in ("6", "2-0-6", "4-1-6"):
        replay = window.replay(userid, new_uuid(), foreign)
        reset, *events = replay.frames
        assert b"event: reset" in reset
        assert b"id: 4-2-4\n" in reset  # just before the first event kept
        assert json.loads(reset.split(b"data: ")[1]) == {"lastEventId": foreign, "resumeFrom": 5}
        assert events == [b"event 5", b"event 6", b"event 7"]


def test_an_unpartitioned_server_resets_a_resume_with_a_partitioned_id() -> None:
    window = ReplayWindow(Clock(), 300, 100)
    userid = new_uuid()
    window.record(userid, None, 3, b"event 3")
    reset, event = window.replay(userid, new_uuid(), "4-0-2").frames
    assert b"event: reset" in reset
    assert b"id: 2\n" in reset
    assert event == b"event 3"


def test_a_stream_at_the_end_of_its_life_gets_the_newest_id_of_its_own_partition() -> None:
    clock = Clock()
    registry = StreamRegistry()
    windows = {n: ReplayWindow(clock, 300, 100, partition=Partition(4, n)) for n in (0, 1)}
    windows[0].consumed(7)
    windows[1].consumed(41)
    lifetimes = StreamLifetimeService(
        registry, lambda userid: windows.get(partition_of(userid, 4)), clock, 1000, 0
    )
    requests = {}
    for number in (0, 1):
        requests[number] = DummyRequest([b""])
        registry.add(
            EventStream(user_in(number), new_uuid(), requests[number], "c", 1000, expires_at=1)
        )
    clock.advance(2)
    assert lifetimes.close_expired() == 2
    assert b"".join(requests[0].written).startswith(b"id: 4-0-7\n\n")
    assert b"".join(requests[1].written).startswith(b"id: 4-1-41\n\n")


def test_readiness_names_the_partition_still_reading_back() -> None:
    class Consumer(Service):
        consuming = True
        behind: str | None = None
        last_offset = None

    zero, one = Consumer(), Consumer()
    one.behind = "reading back"
    both = PartitionedConsumer([(0, zero), (1, one)])  # type: ignore[list-item]
    check = ConsumerCheck(both, "messages-0, messages-1")
    state = check.check().result
    assert not state.ready
    assert state.state == "reading back (partition 1)"
    one.behind = None
    assert check.check().result.ready
    zero.consuming = False
    assert check.check().result.state == "not consuming"


def test_a_message_published_to_a_partition_its_user_does_not_live_in_is_skipped() -> None:
    metrics = Metrics()
    registry = StreamRegistry()
    window = ReplayWindow(Clock(), 300, 100, partition=Partition(4, 1))
    router = MessageRouter(registry, window, 10_000, metrics)
    stranger = json.dumps(found_contract(user_in(3))).encode()
    resident = json.dumps(found_contract(user_in(1))).encode()
    assert router(stranger, 0) == 0
    router(resident, 1)
    assert len(window) == 1
    assert window.newest == 1
    skipped = metrics.registry.get_sample_value(
        "sse_messages_skipped_total", {"reason": "wrong_partition"}
    )
    assert skipped == 1


def test_a_message_kept_unread_replays_with_its_partitions_id() -> None:
    registry = StreamRegistry()
    partition = Partition(4, 1)
    window = ReplayWindow(Clock(), 300, 100, partition=partition)
    router = MessageRouter(registry, window, 10_000, Metrics())
    userid = user_in(1)
    message = found_contract(userid)
    # Nobody here has a stream of this user: the message is kept as it came.
    assert router(json.dumps(message).encode(), 7) == 0
    replay = window.replay(userid, new_uuid(), partition.event_id(6))
    [frame] = replay.frames
    assert frame.startswith(b"id: 4-1-7\n")


def test_a_new_stream_held_during_the_read_back_starts_at_its_partitions_tail() -> None:
    registry = StreamRegistry()
    window = ReplayWindow(Clock(), 300, 100, partition=Partition(4, 1))
    live = LiveStart(registry, window, Clock(), 3)
    userid = user_in(1)
    request = DummyRequest([b""])
    stream = EventStream(userid, new_uuid(), request, "c", 1000)
    assert live.start(stream, None) == []  # held: the tail is not known yet
    registry.add(stream)
    for offset in (5, 6):
        window.record(userid, None, offset, b"id: 4-1-%d\ndata: x\n\n" % offset)
    live.tail_known(5)
    assert b"".join(request.written) == b"id: 4-1-5\n\nid: 4-1-6\ndata: x\n\n"
    assert stream.resume_after == 5


def test_a_re_created_partition_resets_only_the_streams_of_its_own_users() -> None:
    registry = StreamRegistry()
    windows = [ReplayWindow(Clock(), 300, 100, partition=Partition(4, n)) for n in (0, 1)]
    lives = [LiveStart(registry, window, Clock(), 3) for window in windows]
    streams = []
    for number in (0, 1):
        request = DummyRequest([b""])
        stream = EventStream(user_in(number), new_uuid(), request, "c", 1000, resume_after=9)
        registry.add(stream)
        streams.append((stream, request))
    lives[0].new_stream(9)
    (first, first_request), (second, second_request) = streams
    assert b"event: reset" in b"".join(first_request.written)
    assert b"id: 4-0--1\n" in b"".join(first_request.written)
    assert first.resume_after == -1
    assert second_request.written == []
    assert second.resume_after == 9


def test_the_partitions_to_consume_default_to_all_and_must_exist() -> None:
    def config(**settings: str) -> Any:
        return load_config({"SSE_CERTS_DIR": str(Path(__file__).parent), **settings})

    assert config().partitions == (0,)
    assert config(SSE_RABBITMQ_PARTITIONS="4").partitions == (0, 1, 2, 3)
    assert config(SSE_RABBITMQ_PARTITIONS="4", SSE_PARTITIONS="3, 1").partitions == (1, 3)
    with pytest.raises(ConfigError, match="SSE_PARTITIONS: partition 4 does not exist"):
        config(SSE_RABBITMQ_PARTITIONS="4", SSE_PARTITIONS="0,4")
    with pytest.raises(ConfigError, match="partition 1 is listed twice"):
        config(SSE_RABBITMQ_PARTITIONS="4", SSE_PARTITIONS="1,1")
    with pytest.raises(ConfigError, match="SSE_RABBITMQ_PARTITIONS"):
        config(SSE_RABBITMQ_PARTITIONS="0")


# --- on the machine's RabbitMQ and PostgreSQL ---


def _broker() -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))


def _first_message(connection: pika.BlockingConnection, queue: str) -> bytes:
    """The body of the first message of the stream ``queue``."""
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    for method, _, body in channel.consume(
        queue, arguments={"x-stream-offset": "first"}, inactivity_timeout=10
    ):
        assert method is not None, f"nothing in {queue}"
        channel.basic_ack(method.delivery_tag)
        channel.close()
        return bytes(body)
    raise AssertionError("unreachable")


def consumers_by_queue() -> dict[str, int]:
    """How many consumers the broker has on each queue (``rabbitmqctl list_queues``: a
    passive declaration reports none on a stream, and 3.10's ``list_consumers`` omits
    stream consumers)."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "name", "consumers"],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    )
    return {queue["name"]: int(queue["consumers"]) for queue in json.loads(listed.stdout)}


def queue_arguments(queue: str) -> dict[str, Any]:
    """The arguments ``queue`` was declared with (``rabbitmqctl list_queues``)."""
    listed = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--formatter", "json", "name", "arguments"],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    )
    (arguments,) = [row["arguments"] for row in json.loads(listed.stdout) if row["name"] == queue]
    return {name: value for name, _, value in arguments}  # [name, type, value] each


@pytest.fixture
def partitioned_environ(plaintext_environ: dict[str, str]) -> Iterator[dict[str, str]]:
    """A P = 4 server consuming partitions 0 and 1 of its own super stream (deleted after)."""
    name = f"messages-{new_uuid()}"
    yield {
        **plaintext_environ,
        "SSE_RABBITMQ_QUEUE_NAME": name,
        "SSE_RABBITMQ_PARTITIONS": str(PARTITIONS),
        "SSE_PARTITIONS": "0,1",
        "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "1",
    }
    delete_super_stream(5672, name, PARTITIONS)


@pytest_twisted.async_yield_fixture
async def server(partitioned_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    running = await start_server(partitioned_environ)
    await wait_for(lambda: running.service.consumer.behind is None, "partitions read back")
    yield running
    await running.stop()


def add_user(environ: dict[str, str], userid: str) -> str:
    token = new_token()
    with (
        psycopg2.connect(
            host="127.0.0.1", user="postgres", dbname=environ["SSE_POSTGRES_DB_NAME"]
        ) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
    return token


async def publish_with_the_tool(stream: str, userid: str, filename: str) -> None:
    arguments = ["--queue", stream, "--partitions", str(PARTITIONS), "--userid", userid]
    status = await bounded(deferToThread(publish_tool.main, [*arguments, "--filename", filename]))
    assert status == 0


@pytest_twisted.ensureDeferred
async def test_the_server_declares_the_super_stream_layout_add_super_stream_makes(
    server: RunningServer,
) -> None:
    name = server.config.rabbitmq_queue_name

    def route_and_read_back() -> list[bytes]:
        connection = _broker()
        try:
            channel = connection.channel()
            channel.exchange_declare(name, passive=True)
            # Each binding routes its key to its partition, and no other key is bound.
            channel.confirm_delivery()
            for number in range(4):
                channel.basic_publish(name, str(number), b"to %d" % number, mandatory=True)
            with pytest.raises(pika.exceptions.UnroutableError):
                channel.basic_publish(name, "4", b"to 4", mandatory=True)
            return [_first_message(connection, f"{name}-{number}") for number in range(4)]
        finally:
            connection.close()

    assert await deferToThread(route_and_read_back) == [b"to 0", b"to 1", b"to 2", b"to 3"]
    # Only partitions 0 and 1 are consumed here.
    consumers = await deferToThread(consumers_by_queue)
    assert [consumers[f"{name}-{n}"] for n in range(4)] == [1, 1, 0, 0]
    arguments = await deferToThread(queue_arguments, f"{name}-3")
    assert arguments == {
        "x-queue-type": "stream",
        "x-max-age": "1D",
        "x-queue-leader-locator": "balanced",
        "x-initial-cluster-size": 1,
    }


@pytest_twisted.ensureDeferred
async def test_an_instance_delivers_its_partitions_users_messages_and_sends_others_back(
    server: RunningServer,
    partitioned_environ: dict[str, str],
    browser: Browser,
    log_events: Sequence[LogEvent],
) -> None:
    name = server.config.rabbitmq_queue_name
    zero, one, three = user_in(0), user_in(1), user_in(3)
    tokens = {userid: add_user(partitioned_environ, userid) for userid in (zero, one, three)}
    _, zeros_tab = await browser.open(server.subscribe_url(new_uuid(), zero, tokens[zero]))
    _, ones_tab = await browser.open(server.subscribe_url(new_uuid(), one, tokens[one]))
    await wait_for(lambda: len(server.service.registry) == 2, "two streams open")

    for userid in (three, zero, one, three, one):
        await publish_with_the_tool(name, userid, f"for {userid}")
    zeros = [await zeros_tab.next_event()]
    ones = [await ones_tab.next_event(), await ones_tab.next_event()]
    assert [json.loads(event["data"])["userid"] for event in zeros + ones] == [zero, one, one]
    assert [event["id"] for event in zeros] == ["4-0-0"]
    assert [event["id"] for event in ones] == ["4-1-0", "4-1-1"]
    consumed = server.service.metrics.registry.get_sample_value("sse_messages_consumed_total")
    assert consumed == 3  # none of partition 3's two
    # Partitions 2 and 3 are not consumed here: their messages stay in the broker, unread.
    consumers = await deferToThread(consumers_by_queue)
    assert [consumers[f"{name}-{n}"] for n in range(4)] == [1, 1, 0, 0]

    response = await browser.get(server.subscribe_url(new_uuid(), three, tokens[three]))
    body = await browser.read_body(response)
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert body.startswith(b"retry: ")
    assert b": not this server's partition, retry\n" in body
    assert b"data:" not in body
    wrong_shard = server.service.metrics.registry.get_sample_value(
        "sse_subscribes_total", {"outcome": "wrong_shard"}
    )
    assert wrong_shard == 1
    (warning,) = [line for line in warnings_logged(log_events) if "wrong_shard" in line]
    assert "partition 3 of 4" in warning
    assert "partitions 0,1" in warning
    assert three not in warning  # not authenticated: never logged


@pytest_twisted.ensureDeferred
async def test_a_resume_within_the_layout_continues_and_one_from_another_layout_is_reset(
    server: RunningServer, partitioned_environ: dict[str, str], browser: Browser
) -> None:
    name = server.config.rabbitmq_queue_name
    userid = user_in(1)
    token = add_user(partitioned_environ, userid)
    for filename in ("a", "b", "c"):
        await publish_with_the_tool(name, userid, filename)
    await wait_for(
        lambda: server.service.consumer.consumers[1].last_offset == 2, "three messages consumed"
    )
    url = server.subscribe_url(new_uuid(), userid, token)

    _, resumed = await browser.open(url, last_event_id="4-1-0")
    events = [await resumed.next_event(), await resumed.next_event()]
    assert [(event["id"], json.loads(event["data"])["filename"]) for event in events] == [
        ("4-1-1", "b"),
        ("4-1-2", "c"),
    ]
    # An id of the unpartitioned stream, of another P, of another partition: reset.
    for foreign in ("1", "2-1-0", "4-0-0"):
        _, reset = await browser.open(url, last_event_id=foreign)
        first = await reset.next_event()
        assert first["event"] == "reset"
        assert json.loads(first["data"]) == {"lastEventId": foreign, "resumeFrom": 0}
        assert first["id"] == "4-1--1"
        replayed = [json.loads((await reset.next_event())["data"])["filename"] for _ in "abc"]
        assert replayed == ["a", "b", "c"]


@pytest_twisted.ensureDeferred
async def test_readiness_waits_for_every_consumed_partition_to_be_read_back(
    partitioned_environ: dict[str, str],
) -> None:
    running = await start_server(partitioned_environ)
    try:
        consumer = running.service.consumer
        await wait_for(lambda: consumer.behind is None, "read back")
        assert consumer.consuming
        # Partition 1's consumer alone going away makes the whole instance not ready.
        partition_one = consumer.consumers[1]
        await partition_one.stopService()
        assert not consumer.consuming
        partition_one.startService()
        await wait_for(lambda: consumer.consuming, "partition 1 consumed again")
    finally:
        await running.stop()


@pytest.mark.parametrize(
    ("prepare", "refusal"),
    [
        ("more partitions", "has more partitions than SSE_RABBITMQ_PARTITIONS=4"),
        ("classic partition", "exists as a non-stream queue"),
        ("fanout exchange", "is not a super stream's direct exchange"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_layout_that_does_not_match_stops_start_up_with_one_line(
    partitioned_environ: dict[str, str], prepare: str, refusal: str
) -> None:
    name = partitioned_environ["SSE_RABBITMQ_QUEUE_NAME"]

    def make_it() -> None:
        connection = _broker()
        try:
            channel = connection.channel()
            if prepare == "more partitions":
                channel.queue_declare(
                    f"{name}-4", durable=True, arguments={"x-queue-type": "stream"}
                )
            elif prepare == "classic partition":
                channel.queue_declare(f"{name}-2", durable=True)
            else:
                channel.exchange_declare(name, "fanout", durable=True)
        finally:
            connection.close()

    await deferToThread(make_it)
    running = await start_server(partitioned_environ, consuming=False)
    try:
        await wait_for(lambda: running.fatal, "start-up refused")
        (line,) = running.fatal
        assert refusal in line
        assert "\n" not in line
    finally:
        await running.stop()
