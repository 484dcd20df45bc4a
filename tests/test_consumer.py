"""The stream consumer against real RabbitMQ brokers over real sockets.

The system broker (127.0.0.1:5672) serves the tests that leave it running; outages and TLS
use the private node of the ``rabbitmq_tls`` fixture, so other users of the system broker
are never disturbed.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from uuid import uuid4

import pika
import pika.exceptions
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from zope.interface import implementer

from sse_twisted import _consumer
from sse_twisted._config import Config, load_config
from sse_twisted._consumer import StreamConsumerService
from sse_twisted._metrics import Metrics
from sse_twisted.devcerts import (
    DEV_CERTIFICATE_FILES,
    issue_certificate,
    load_certificate_authority,
)
from tests.backends import Pki, RabbitMQServer
from tests.in_process_server import socket_transport
from tests.logs import lines_with
from tests.publishing import delete_queue
from tests.waiting import bounded

TIMEOUT = 30


@dataclass(frozen=True)
class Broker:
    """Blocking pika helpers for one broker's plain AMQP port; run them in a thread."""

    port: int
    host: str = "127.0.0.1"

    def _connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(pika.ConnectionParameters(self.host, self.port))

    def publish(self, queue: str, bodies: list[bytes], *, until_routable: bool = False) -> None:
        """Publish to ``queue`` with publisher confirms: return once the broker has them.

        ``until_routable`` republishes a message the broker returns for want of the queue,
        as it does for a while after a restart, until it recovers the stream.
        """
        deadline = time.monotonic() + TIMEOUT
        with self._connect() as connection:
            channel = connection.channel()
            channel.confirm_delivery()
            for body in bodies:
                while True:
                    try:
                        channel.basic_publish("", queue, body, mandatory=True)
                        break
                    except pika.exceptions.UnroutableError:
                        if not until_routable or time.monotonic() > deadline:
                            raise
                        # The broker gives no signal when the stream is back: ask again.
                        time.sleep(0.1)

    def declare(self, queue: str, arguments: dict[str, Any] | None = None) -> None:
        """Declare a durable ``queue``: classic unless ``arguments`` say otherwise."""
        with self._connect() as connection:
            connection.channel().queue_declare(queue, durable=True, arguments=arguments)


class Inbox:
    """The ``on_message`` callable: records deliveries; wait for a number of them."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.offsets: list[int] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def __call__(self, body: bytes, offset: int) -> None:
        self.bodies.append(body)
        self.offsets.append(offset)
        self._wake()

    def _wake(self) -> None:
        for entry in list(self._waiting):
            count, waiter = entry
            if len(self.bodies) >= count:
                self._waiting.remove(entry)
                # Resume the test outside the consumer's delivery call.
                reactor.callLater(0, waiter.callback, None)

    def wait_for(self, count: int) -> Deferred[None]:
        """Fire once ``count`` messages have arrived in all."""
        waiter: Deferred[None] = Deferred()
        self._waiting.append((count, waiter))
        self._wake()
        return bounded(waiter, TIMEOUT)


@implementer(ILogObserver)
class LogWatcher:
    """Collects every log event while installed; wait for lines holding some text."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []
        self._waiting: list[tuple[str, int, Deferred[list[str]]]] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)
        self._wake()

    def lines(self, text: str = "") -> list[str]:
        """Formatted messages containing ``text``."""
        return lines_with(self.events, text)

    def _wake(self) -> None:
        for entry in list(self._waiting):
            text, count, waiter = entry
            found = self.lines(text)
            if len(found) >= count:
                self._waiting.remove(entry)
                reactor.callLater(0, waiter.callback, found)

    def wait_for(self, text: str, count: int = 1) -> Deferred[list[str]]:
        """Fire with the matching lines once ``count`` lines contain ``text``."""
        waiter: Deferred[list[str]] = Deferred()
        self._waiting.append((text, count, waiter))
        self._wake()
        return bounded(waiter, TIMEOUT)


@pytest.fixture
def logs() -> Iterator[LogWatcher]:
    watcher = LogWatcher()
    globalLogPublisher.addObserver(watcher)
    yield watcher
    globalLogPublisher.removeObserver(watcher)
    print("\n".join(watcher.lines()))  # shown with a failure


@pytest.fixture
def system_broker() -> Broker:
    return Broker(5672)


@pytest.fixture
def private_broker(rabbitmq_tls: RabbitMQServer) -> Broker:
    return Broker(rabbitmq_tls.amqp_port)


@pytest.fixture
def new_queue() -> Iterator[Callable[[Broker], str]]:
    """Make unique queue names on a broker; the queues are deleted after the test."""
    created: list[tuple[Broker, str]] = []

    def new(broker: Broker) -> str:
        name = f"sse-test-{uuid4().hex}"
        created.append((broker, name))
        return name

    yield new
    for broker, name in created:
        delete_queue(broker.port, name)


def consumer_config(certs_dir: Path, port: int, queue: str, **changes: Any) -> Config:
    """Plain AMQP to 127.0.0.1:``port`` as guest, consuming ``queue``; ``changes`` on top."""
    config = load_config(
        {
            "SSE_CERTS_DIR": str(certs_dir),
            "SSE_RABBITMQ_HOST": "127.0.0.1",
            "SSE_RABBITMQ_PORT": str(port),
            "SSE_RABBITMQ_TLS": "false",
            "SSE_RABBITMQ_QUEUE_NAME": queue,
        }
    )
    return replace(config, **changes)


def unexpected_fatal(reason: str) -> None:
    raise AssertionError(f"on_fatal called: {reason}")


@asynccontextmanager
async def running(consumer: StreamConsumerService) -> AsyncIterator[StreamConsumerService]:
    """Run ``consumer`` for the block; stopping must finish in time."""
    consumer.startService()
    try:
        yield consumer
    finally:
        await bounded(consumer.stopService(), TIMEOUT)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_messages_after_start_arrive_in_order_with_increasing_offsets(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str], logs: LogWatcher
) -> None:
    queue = new_queue(system_broker)
    stream = {"x-queue-type": "stream", "x-max-age": "1D"}
    await deferToThread(system_broker.declare, queue, stream)
    await deferToThread(system_broker.publish, queue, [b"before start"])
    inbox = Inbox()
    # A small window: were acks lost, delivery would stall after 10 messages.
    config = consumer_config(tmp_path, 5672, queue, rabbitmq_prefetch=10, replay_seconds=0)
    consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
    # Some larger than the pieces pika is fed (4 KiB), so that frames span them.
    bodies = [f"message {number}".encode() + b"x" * (number * 97 % 9000) for number in range(500)]
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at ")
        assert consumer.consuming
        await deferToThread(system_broker.publish, queue, bodies)
        await inbox.wait_for(len(bodies))
        assert inbox.bodies == bodies
        assert inbox.offsets == sorted(set(inbox.offsets))
        assert consumer.last_offset == inbox.offsets[-1]
    assert not consumer.consuming


async def _paused_once_within(turns: int, reads: object) -> bool:
    """Whether the consumer's socket leaves the reactor's readers in the next ``turns``."""
    for _ in range(turns):
        if reads not in reactor.getReaders():
            return True
        await deferLater(reactor, 0)
    return False


async def _trickle(
    broker: Broker, queue: str, consumer: StreamConsumerService, inbox: Inbox, bodies: list[bytes]
) -> int:
    """Publish ``bodies`` one at a time, each once the one before has arrived (so that a pause
    must end); how many of their reads were seen followed by a pause."""
    assert consumer._connection is not None
    reads = socket_transport(consumer._connection.transport)
    paused = 0
    for body in bodies:
        arrived = len(inbox.bodies) + 1  # counted first: it may arrive before publish returns
        await deferToThread(broker.publish, queue, [body])
        await inbox.wait_for(arrived)
        paused += await _paused_once_within(10, reads)
    return paused


@pytest.mark.parametrize("tls", [False, True], ids=["amqp", "amqps"])
@pytest_twisted.ensureDeferred
async def test_paced_reads_lose_nothing_trickling_behind_or_across_a_reconnection(
    tls: bool,
    pki: Pki,
    rabbitmq_tls: RabbitMQServer,
    system_broker: Broker,
    private_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
) -> None:
    broker = private_broker if tls else system_broker
    queue = new_queue(broker)
    if tls:
        config = tls_config(pki.directory, rabbitmq_tls, queue, "localhost")
    else:
        config = consumer_config(pki.directory, 5672, queue)
    # A small window too: paced, the acks must still keep the broker sending.
    config = replace(config, ingest_batch_milliseconds=50, rabbitmq_prefetch=10)
    inbox = Inbox()
    consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
    trickle = [f"trickle {number}".encode() for number in range(20)]
    behind = [f"behind {number}".encode() + b"x" * (number * 97 % 9000) for number in range(300)]
    again = [f"again {number}".encode() for number in range(20)]
    async with running(consumer):
        await logs.wait_for(f"read back {queue} ")  # live: paced from now on
        paused = await _trickle(broker, queue, consumer, inbox, trickle)
        await deferToThread(broker.publish, queue, behind)  # read at full speed
        await inbox.wait_for(len(trickle) + len(behind))
        assert consumer._connection is not None
        consumer._connection.transport.abortConnection()
        await logs.wait_for(f"consuming {queue} at ", count=2)  # live again at once
        paused_again = await _trickle(broker, queue, consumer, inbox, again)
    assert inbox.bodies == trickle + behind + again
    assert inbox.offsets == list(range(inbox.offsets[0], inbox.offsets[0] + len(inbox.offsets)))
    # Each small read pauses until the next 50 ms point; seen unless that point is very near.
    assert paused >= len(trickle) // 2
    assert paused_again >= len(again) // 2


@dataclass
class _AckRecorder:
    """Stands in for the consumer's pika channel: records the acknowledgements sent."""

    is_open: bool = True
    acks: list[tuple[int, bool]] = field(default_factory=list)

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acks.append((delivery_tag, multiple))


def test_a_paced_stream_is_acked_once_per_interval_and_a_busy_one_every_half_window(
    tmp_path: Path,
) -> None:
    clock = MemoryReactorClock()
    config = consumer_config(tmp_path, 5672, "never-connected", rabbitmq_prefetch=10)
    consumer = StreamConsumerService(config, clock, Inbox(), unexpected_fatal, Metrics())
    channel = _AckRecorder()
    consumer._channel = channel  # type: ignore[assignment]
    for tag in (1, 2, 3):  # a few deliveries, each in a reactor turn of its own
        consumer._acknowledge(tag)
        clock.advance(0.01)
    assert channel.acks == []
    clock.advance(_consumer._ACK_SECONDS)
    assert channel.acks == [(3, True)]
    for tag in range(4, 9):  # half the window of 10 at once: acked without waiting
        consumer._acknowledge(tag)
    assert channel.acks == [(3, True), (8, True)]
    clock.advance(_consumer._ACK_SECONDS)
    assert channel.acks == [(3, True), (8, True)]


@pytest_twisted.ensureDeferred
async def test_a_fresh_consumer_reads_back_the_replay_window(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str], logs: LogWatcher
) -> None:
    queue = new_queue(system_broker)
    stream = {"x-queue-type": "stream", "x-max-age": "1D"}
    await deferToThread(system_broker.declare, queue, stream)
    await deferToThread(system_broker.publish, queue, [b"published before start"])
    inbox = Inbox()
    consumer = StreamConsumerService(
        consumer_config(tmp_path, 5672, queue, replay_seconds=300),
        reactor,
        inbox,
        unexpected_fatal,
        Metrics(),
    )
    async with running(consumer):
        await inbox.wait_for(1)
        await deferToThread(system_broker.publish, queue, [b"published after start"])
        await inbox.wait_for(2)
    assert inbox.bodies == [b"published before start", b"published after start"]


@pytest_twisted.ensureDeferred
async def test_a_failing_on_message_is_logged_and_consumption_goes_on(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str], logs: LogWatcher
) -> None:
    queue = new_queue(system_broker)
    inbox = Inbox()

    def on_message(body: bytes, offset: int) -> None:
        inbox(body, offset)
        if body == b"poison":
            raise ValueError("cannot route this")

    consumer = StreamConsumerService(
        consumer_config(tmp_path, 5672, queue), reactor, on_message, unexpected_fatal, Metrics()
    )
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at ")
        await deferToThread(system_broker.publish, queue, [b"poison", b"fine"])
        await inbox.wait_for(2)
    assert inbox.bodies == [b"poison", b"fine"]
    failures = [event for event in logs.events if "log_failure" in event]
    assert [event["log_failure"].value.args for event in failures] == [("cannot route this",)]
    assert consumer.last_offset == inbox.offsets[1]


@pytest_twisted.ensureDeferred
async def test_a_classic_queue_of_the_same_name_is_fatal_and_explained_in_one_line(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str]
) -> None:
    queue = new_queue(system_broker)
    await deferToThread(system_broker.declare, queue)
    fatal: Deferred[str] = Deferred()
    consumer = StreamConsumerService(
        consumer_config(tmp_path, 5672, queue), reactor, Inbox(), fatal.callback, Metrics()
    )
    async with running(consumer):
        reason = await bounded(fatal, TIMEOUT)
        assert "\n" not in reason
        assert f"{queue!r} exists as a non-stream queue" in reason
        assert "delete it or set SSE_RABBITMQ_QUEUE_NAME to another name" in reason
        assert not consumer.consuming
        assert not consumer._client.running  # it no longer reconnects


@pytest.mark.parametrize(
    ("declared", "setting", "argument"),
    [
        ({"x-max-age": "2D"}, {"rabbitmq_max_age": "1D"}, "x-max-age"),
        (
            {"x-max-age": "1D"},
            {"rabbitmq_initial_cluster_size": 3},
            "x-initial-cluster-size",
        ),
    ],
    ids=["retention", "replication"],
)
@pytest_twisted.ensureDeferred
async def test_a_stream_declared_with_other_arguments_is_consumed_as_it_is(
    tmp_path: Path,
    system_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
    declared: dict[str, Any],
    setting: dict[str, Any],
    argument: str,
) -> None:
    queue = new_queue(system_broker)
    await deferToThread(system_broker.declare, queue, {"x-queue-type": "stream", **declared})
    inbox = Inbox()
    config = consumer_config(tmp_path, 5672, queue, **setting)
    consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at ")
        await deferToThread(system_broker.publish, queue, [b"kept as the stream is"])
        await inbox.wait_for(1)
    assert inbox.bodies == [b"kept as the stream is"]
    [warning] = logs.lines("exists with other arguments")
    assert argument in warning


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_logs_the_brokers_reason_but_never_the_password(
    tmp_path: Path,
    system_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    password = f"not-the-password-{uuid4().hex}"
    config = consumer_config(tmp_path, 5672, new_queue(system_broker), rabbitmq_password=password)
    consumer = StreamConsumerService(config, reactor, Inbox(), unexpected_fatal, Metrics())
    async with running(consumer):
        # Two refusals: the first is logged with its reason, and the service retried.
        refusals = await logs.wait_for("ACCESS_REFUSED", count=2)
        assert not consumer.consuming
    assert "403" in refusals[0]
    assert "127.0.0.1:5672" in refusals[0]
    assert all(password not in repr(event) for event in logs.events)
    assert password not in caplog.text


@pytest_twisted.ensureDeferred
async def test_an_unreachable_broker_is_retried_with_the_refusal_logged(
    tmp_path: Path, logs: LogWatcher
) -> None:
    port = closed_port()
    consumer = StreamConsumerService(
        consumer_config(tmp_path, port, "never-declared"),
        reactor,
        Inbox(),
        unexpected_fatal,
        Metrics(),
    )
    async with running(consumer):
        refusals = await logs.wait_for("Connection refused", count=2)
        assert not consumer.consuming
    assert f"cannot connect to RabbitMQ at amqp://127.0.0.1:{port}" in refusals[0]


@pytest_twisted.ensureDeferred
async def test_a_peer_that_never_answers_the_handshake_is_dropped_and_retried(
    tmp_path: Path, logs: LogWatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_consumer, "_HANDSHAKE_TIMEOUT_SECONDS", 0.2)
    silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    try:
        consumer = StreamConsumerService(
            consumer_config(tmp_path, silent.getHost().port, "never-declared"),
            reactor,
            Inbox(),
            unexpected_fatal,
            Metrics(),
        )
        async with running(consumer):
            await logs.wait_for("no AMQP handshake within 0.2 seconds", count=2)
    finally:
        await silent.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_restart_before_any_message_still_gets_those_published_meanwhile(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str], logs: LogWatcher
) -> None:
    queue = new_queue(system_broker)
    inbox = Inbox()
    consumer = StreamConsumerService(
        consumer_config(tmp_path, 5672, queue), reactor, inbox, unexpected_fatal, Metrics()
    )
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at ")
    await deferToThread(system_broker.publish, queue, [b"while away"])
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at ", count=2)
        await deferToThread(system_broker.publish, queue, [b"after return"])
        await inbox.wait_for(2)
    assert inbox.bodies == [b"while away", b"after return"]


@pytest_twisted.ensureDeferred
async def test_a_broker_outage_mid_stream_loses_and_repeats_nothing(
    tmp_path: Path,
    rabbitmq_tls: RabbitMQServer,
    private_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
) -> None:
    queue = new_queue(private_broker)
    # Our own user, so that the test can keep the consumer out until it has published.
    user, password = f"consumer-{uuid4().hex}", uuid4().hex
    rabbitmqctl = rabbitmq_tls.rabbitmqctl
    await deferToThread(rabbitmqctl, "add_user", user, password)
    await deferToThread(rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
    config = consumer_config(
        tmp_path,
        private_broker.port,
        queue,
        rabbitmq_username=user,
        rabbitmq_password=password,
    )
    inbox = Inbox()
    consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
    first = [f"before {number}".encode() for number in range(50)]
    second = [f"after {number}".encode() for number in range(50)]
    try:
        async with running(consumer):
            await logs.wait_for(f"consuming {queue} at ")
            await deferToThread(private_broker.publish, queue, first)
            await inbox.wait_for(len(first))
            # Checked when a connection opens only: the running consumer goes on.
            await deferToThread(rabbitmqctl, "clear_permissions", "-p", "/", user)
            await deferToThread(rabbitmq_tls.stop_app)
            try:
                lost = await logs.wait_for("lost RabbitMQ connection")
            finally:
                await deferToThread(rabbitmq_tls.start_app)
            refused = await logs.wait_for("NOT_ALLOWED")
            await deferToThread(private_broker.publish, queue, second, until_routable=True)
            await deferToThread(rabbitmqctl, "set_permissions", "-p", "/", user, ".*", ".*", ".*")
            await inbox.wait_for(len(first) + len(second))
            assert consumer.consuming
    finally:
        await deferToThread(rabbitmqctl, "delete_user", user)
    assert "CONNECTION_FORCED" in lost[0]
    assert "ended before consuming" in refused[0]
    assert inbox.bodies == first + second
    assert inbox.offsets == list(range(inbox.offsets[0], inbox.offsets[0] + 100))
    assert all(password not in repr(event) for event in logs.events)


def tls_config(certs_dir: Path, server: RabbitMQServer, queue: str, host: str) -> Config:
    return consumer_config(
        certs_dir,
        server.amqps_port,
        queue,
        rabbitmq_tls=True,
        rabbitmq_host=host,
    )


@pytest_twisted.ensureDeferred
async def test_amqps_with_our_client_certificate_consumes(
    pki: Pki,
    rabbitmq_tls: RabbitMQServer,
    private_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
) -> None:
    queue = new_queue(private_broker)
    inbox = Inbox()
    config = tls_config(pki.directory, rabbitmq_tls, queue, "localhost")
    consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
    async with running(consumer):
        await logs.wait_for(f"consuming {queue} at amqps://localhost:{rabbitmq_tls.amqps_port}")
        await deferToThread(private_broker.publish, queue, [b"over TLS"])
        await inbox.wait_for(1)
        connections = await deferToThread(
            rabbitmq_tls.rabbitmqctl,
            *("--quiet", "--no-table-headers", "list_connections", "ssl", "peer_cert_subject"),
        )
    assert inbox.bodies == [b"over TLS"]
    # Ours is the only connection: over TLS, with the client certificate it presented.
    assert [line.split("\t") for line in connections.splitlines()] == [["true", "CN=localhost"]]


@pytest_twisted.ensureDeferred
async def test_amqps_rejects_a_broker_certificate_from_another_ca(
    tmp_path: Path,
    pki: Pki,
    rabbitmq_tls: RabbitMQServer,
    logs: LogWatcher,
) -> None:
    files = DEV_CERTIFICATE_FILES
    for name in (files.rabbitmq_client_certificate, files.rabbitmq_client_key):
        shutil.copy(pki.directory / name, tmp_path / name)
    shutil.copy(pki.wrong_ca_certificate, tmp_path / files.rabbitmq_ca)
    config = tls_config(tmp_path, rabbitmq_tls, "never-declared", "localhost")
    consumer = StreamConsumerService(config, reactor, Inbox(), unexpected_fatal, Metrics())
    async with running(consumer):
        failures = await logs.wait_for("certificate verify failed")
        assert not consumer.consuming
    assert "ended before consuming" in failures[0]


@pytest_twisted.ensureDeferred
async def test_amqps_rejects_a_certificate_for_another_host(pki: Pki, logs: LogWatcher) -> None:
    # A server with a certificate from the right CA, for a name we do not connect to.
    files = DEV_CERTIFICATE_FILES
    authority = load_certificate_authority(
        pki.directory / files.ca_certificate, pki.directory / files.ca_key
    )
    certificate, key = issue_certificate(authority, ["elsewhere.invalid"])
    impostor_tls = CertificateOptions(privateKey=key, certificate=certificate)  # type: ignore[arg-type]
    impostor = await SSL4ServerEndpoint(reactor, 0, impostor_tls, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    try:
        port = impostor.getHost().port
        config = consumer_config(pki.directory, port, "never-declared", rabbitmq_tls=True)
        consumer = StreamConsumerService(config, reactor, Inbox(), unexpected_fatal, Metrics())
        async with running(consumer):
            failures = await logs.wait_for("ended before consuming")
            assert not consumer.consuming
    finally:
        await impostor.stopListening()
    assert "127.0.0.1" in failures[0]
    assert "VerificationError" in failures[0]


@pytest_twisted.ensureDeferred
async def test_a_classic_queue_is_refused_in_one_line_also_with_a_replication_setting(
    tmp_path: Path, system_broker: Broker, new_queue: Callable[[Broker], str]
) -> None:
    queue = new_queue(system_broker)
    await deferToThread(system_broker.declare, queue)
    fatal: Deferred[str] = Deferred()
    config = consumer_config(tmp_path, 5672, queue, rabbitmq_initial_cluster_size=3)
    consumer = StreamConsumerService(config, reactor, Inbox(), fatal.callback, Metrics())
    async with running(consumer):
        reason = await bounded(fatal, TIMEOUT)
    assert "\n" not in reason
    assert f"{queue!r} exists as a non-stream queue" in reason


@pytest_twisted.ensureDeferred
async def test_amqps_checks_each_node_against_its_own_name_and_moves_on_to_the_next(
    pki: Pki,
    rabbitmq_tls: RabbitMQServer,
    private_broker: Broker,
    new_queue: Callable[[Broker], str],
    logs: LogWatcher,
) -> None:
    # The first node listed presents a certificate for another name: refused, the consumer
    # goes on to the second, whose certificate is for the name it is listed by.
    files = DEV_CERTIFICATE_FILES
    authority = load_certificate_authority(
        pki.directory / files.ca_certificate, pki.directory / files.ca_key
    )
    certificate, key = issue_certificate(authority, ["elsewhere.invalid"])
    impostor_tls = CertificateOptions(privateKey=key, certificate=certificate)  # type: ignore[arg-type]
    impostor = await SSL4ServerEndpoint(reactor, 0, impostor_tls, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol)
    )
    queue = new_queue(private_broker)
    impostor_address = f"127.0.0.1:{impostor.getHost().port}"
    try:
        hosts = f"{impostor_address},localhost"
        config = tls_config(pki.directory, rabbitmq_tls, queue, hosts)
        inbox = Inbox()
        consumer = StreamConsumerService(config, reactor, inbox, unexpected_fatal, Metrics())
        async with running(consumer):
            await logs.wait_for(f"consuming {queue} at amqps://localhost:{rabbitmq_tls.amqps_port}")
            await deferToThread(private_broker.publish, queue, [b"from the second node"])
            await inbox.wait_for(1)
    finally:
        await impostor.stopListening()
    [refused] = logs.lines("ended before consuming")
    assert f"amqps://{impostor_address}" in refused
    assert "VerificationError" in refused
    assert inbox.bodies == [b"from the second node"]
