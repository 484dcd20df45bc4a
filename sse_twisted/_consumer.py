"""The RabbitMQ stream consumer: one AMQP connection, kept up, feeding each message onwards."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pika
import pika.channel
import pika.spec
from pika.adapters.twisted_connection import (
    ReceivedMessage,
    TwistedChannel,
    TwistedProtocolConnection,
)
from pika.exceptions import AMQPError, ChannelClosedByBroker, ConsumerCancelled
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ._broker_nodes import BrokerNodesEndpoint, parse_broker_nodes
from ._config import Config
from ._live import LiveStart
from ._metrics import Metrics, amqp_timestamp_seconds
from ._partitions import SuperStream
from ._read_pacing import ReadPacer
from ._ticks import delay_to_tick_by
from ._tls import rabbitmq_client_tls

__all__ = ["StreamConsumerService"]

_PRECONDITION_FAILED = 406
_NOT_FOUND = 404
# With nothing published since it attached, the read-back is over once the consumer has had
# no delivery for this long.
_QUIET_SECONDS = 1.0
# Between the deliveries of one chunk, which the broker sends together.
_CHUNK_SETTLE_SECONDS = 0.2
_HANDSHAKE_TIMEOUT_SECONDS = 30.0
_CLOSE_TIMEOUT_SECONDS = 5.0
# pika re-slices its whole buffer after every frame it decodes, so one read costs the square
# of its size (Twisted reads up to 64 KiB, some 700 frames of deliveries): it is handed at
# most this much at a time, a few dozen frames.
_PIKA_FEED_BYTES = 4096
# The longest a delivery waits for its acknowledgement while fewer than half the prefetch
# window are unacknowledged (half the window is acked at once, so the broker never waits for
# this): a paced stream then costs an ack a few times a second, not one (a frame, a socket
# write and the reactor turns around it) for every reactor turn of a few messages.
_ACK_SECONDS = 0.1


def _describe_amqp_failure(failure: Failure) -> str:
    # pika's exceptions show their reply code and text in repr(); str() of some is empty.
    if isinstance(failure.value, AMQPError):
        return repr(failure.value)
    return failure.getErrorMessage()


class _StreamConnection(TwistedProtocolConnection):
    """pika's Twisted protocol, telling why each connection really ended, and reading in
    batches once live if given a L{ReadPacer}.

    @ivar lost: fires with why the connection ended, once it has.

    pika turns every failure before ``ready`` into ``AMQPConnectionError(1)`` and, once the
    socket closes, replaces its record of why it closed (the broker's ``Connection.Close``
    reply code and text, a missed heartbeat) with ``ConnectionDone``, also in what its
    ``closed`` Deferred and close callbacks are given: that record is read just before, in
    L{connectionLost}, from pika's private ``_impl._error``, which nothing public exposes.
    Checked with pika 1.3.2 and 1.4.4 (pyproject.toml pins the range);
    tests/test_private_names.py fails if it goes.
    """

    def __init__(
        self, parameters: pika.ConnectionParameters, reactor: Any, pacer: ReadPacer | None
    ) -> None:
        super().__init__(parameters, custom_reactor=reactor)
        self._reactor = reactor
        self._pacer = pacer
        self._end_reason: str | None = None
        self._deadline: DelayedCall | None = None
        self.lost: Deferred[str] = Deferred()

    def makeConnection(self, transport: ITransport) -> None:
        super().makeConnection(transport)
        if self._pacer is not None:
            self._pacer.attach(transport)
        # Heartbeats only start after the handshake: a peer that accepts TCP and then says
        # nothing would otherwise hold this connection, and stop retries, forever.
        self._abort_after(_HANDSHAKE_TIMEOUT_SECONDS, "no AMQP handshake")

    def dataReceived(self, data: bytes) -> None:
        for start in range(0, len(data), _PIKA_FEED_BYTES):
            super().dataReceived(data[start : start + _PIKA_FEED_BYTES])
        if self._pacer is not None:
            self._pacer.received()

    def pace_reads(self) -> None:
        """Read in batches from now on, if batching is set (``SSE_INGEST_BATCH_MS``)."""
        if self._pacer is not None:
            self._pacer.arm()

    def connectionReady(self) -> _StreamConnection:
        self._cancel_deadline()
        return self

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._pacer is not None:
            self._pacer.detach()
        pending = self._impl._error  # see the class docstring
        if self._end_reason is None and pending is not None:
            self._end_reason = repr(pending)
        if self._end_reason is not None:
            # The cause is known, and the consumer logs it: pika would also log the end of
            # the socket after a close (ConnectionLost when the broker resets it) as an error.
            reason = Failure(ConnectionDone())
        super().connectionLost(reason)
        self.lost.callback(self._end_reason or reason.getErrorMessage())

    def abandon(self, reason: str) -> None:
        """Close the connection cleanly, reporting ``reason`` as the cause once it is closed."""
        if not self.is_open:
            return
        self._end_reason = self._end_reason or reason
        self.close()
        self._abort_after(_CLOSE_TIMEOUT_SECONDS, "no reply to Connection.Close")

    def _abort_after(self, seconds: float, reason: str) -> None:
        def abort() -> None:
            self._deadline = None
            self._end_reason = self._end_reason or f"{reason} within {seconds} seconds"
            self.transport.abortConnection()

        self._cancel_deadline()
        self._deadline = self._reactor.callLater(seconds, abort)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """An endpoint that hands each failed connection attempt to a callable.

    ClientService only logs that it will retry, never why the attempt failed.
    """

    def __init__(
        self, endpoint: IStreamClientEndpoint, address: str, on_failure: Callable[[Failure], None]
    ) -> None:
        self._endpoint = endpoint
        self._address = address
        self._on_failure = on_failure

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        attempt = self._endpoint.connect(factory)
        attempt.addErrback(self._failed)
        return attempt

    def _failed(self, reason: Failure) -> Failure:
        self._on_failure(reason)
        return reason

    def __repr__(self) -> str:
        return f"<RabbitMQ {self._address}>"


class StreamConsumerService(Service):
    """Consume the stream queue ``queue`` (by default ``config.rabbitmq_queue_name``),
    reconnecting with backoff; with a ``super_stream``, the queue is one of its partitions,
    and the whole layout is declared (or refused) first.

    Each message goes to ``on_message(body, offset)``, synchronously and in stream order;
    when it returns the number of streams written, ``metrics`` counts them.
    The first attachment starts ``config.replay_seconds`` back (or at the next message
    published when that is 0), to fill the replay window: that read-back ends at the tail,
    which a probe consumer attached at "next" learns (its first delivery is the first
    offset published after attaching), or, with nothing published, once no delivery came
    for ``_QUIET_SECONDS`` (when nothing at all was read back, the tail is then read from
    the stream's last chunk); ``live`` is told the tail and when the read-back is read.
    After a reconnection, consumption resumes at the last offset handled, so nothing the
    stream retained during an outage is missed or repeated; that offset must come again
    with the same body, and the probe's first offset must be past it, or the queue is a
    new stream (deleted and re-created): it is then consumed from its first message and
    ``live`` is told to reset the open streams. ``on_fatal`` gets one line when retrying
    cannot help (the queue exists and is not a stream), once it has stopped reconnecting.

    @ivar consuming: True only while the broker has our consumer registered.
    @ivar behind: why the consumer is not yet at the stream's tail (reading back, or the
        position not yet checked after a reconnection), None when it is (readiness).
    @ivar last_offset: stream offset of the last message handed to ``on_message``.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        on_message: Callable[[bytes, int], object],
        on_fatal: Callable[[str], None],
        metrics: Metrics,
        live: LiveStart | None = None,
        queue: str | None = None,
        super_stream: SuperStream | None = None,
    ) -> None:
        self.consuming = False
        self.last_offset: int | None = None
        self._caught_up = False
        self._live = live
        self._last_body = b""
        self._tail: int | None = None
        self._verifying_at: int | None = None
        self._from_first = False
        self._probe_channel: TwistedChannel | None = None
        self._quiet: DelayedCall | None = None
        self._reactor = reactor
        # pika's Twisted adapter ignores host, port and TLS here: the endpoint provides those.
        parameters = pika.ConnectionParameters(
            virtual_host=config.rabbitmq_vhost,
            credentials=pika.PlainCredentials(config.rabbitmq_username, config.rabbitmq_password),
            heartbeat=config.rabbitmq_heartbeat_seconds,
        )
        self._queue = queue or config.rabbitmq_queue_name
        self._queue_arguments: dict[str, object] = {
            "x-queue-type": "stream",
            "x-max-age": config.rabbitmq_max_age,
        }
        if config.rabbitmq_initial_cluster_size is not None:
            # Replicas on that many nodes; unset, the broker's default decides.
            self._queue_arguments["x-initial-cluster-size"] = config.rabbitmq_initial_cluster_size
        self._super_stream = super_stream
        if super_stream is not None:
            self._queue_arguments = super_stream.queue_arguments
        self._prefetch = config.rabbitmq_prefetch
        self._read_interval_seconds = config.ingest_batch_milliseconds / 1000
        self._read_back_seconds = config.replay_seconds
        self._ack_batch = max(1, config.rabbitmq_prefetch // 2)
        self._on_message = on_message
        self._metrics = metrics
        self._on_fatal = on_fatal
        certs_dir = config.certs_dir
        self._nodes = BrokerNodesEndpoint(
            reactor,
            parse_broker_nodes(config.rabbitmq_host, config.rabbitmq_port),
            (lambda host: rabbitmq_client_tls(certs_dir, host)) if config.rabbitmq_tls else None,
        )
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=10.0)
        self._failed_attempts = 0
        self._parameters = parameters
        factory = Factory.forProtocol(self._new_connection)
        factory.noisy = False
        self._client = ClientService(
            _ReportingEndpoint(self._nodes, config.rabbitmq_host, self._connect_failed),
            factory,
            retryPolicy=self._retry_delay,
            clock=reactor,
        )
        self._stopping = False
        self._connection: _StreamConnection | None = None
        # The main consumer's channel, of pika's callback API: see _consume_on.
        self._channel: pika.channel.Channel | None = None
        self._first_attached_at: datetime | None = None
        self._unacked = 0
        self._last_delivery_tag = 0
        self._ack_call: DelayedCall | None = None

    def startService(self) -> None:
        """Connect, and keep reconnecting until stopped."""
        super().startService()
        self._stopping = False
        self._client.startService()

    def stopService(self) -> Deferred[None]:
        """Close the AMQP connection cleanly and stop reconnecting; fire once it is closed."""
        super().stopService()
        return Deferred.fromCoroutine(self._shut_down())

    async def _shut_down(self) -> None:
        self._stopping = True
        connection = self._connection
        if connection is not None:
            connection.abandon("shutting down")
            await connection.lost
        # Also cancels a pending retry or drops a connection still in its handshake.
        await self._client.stopService()

    def _new_connection(self) -> _StreamConnection:
        pacer = None
        if self._read_interval_seconds:
            pacer = ReadPacer(self._reactor, self._read_interval_seconds)
        connection = _StreamConnection(self._parameters, self._reactor, pacer)
        if connection.ready is not None:
            # lost tells why it failed; AMQPConnectionError(1) would add nothing.
            connection.ready.addCallbacks(self._connection_ready, lambda _: None)
        connection.lost.addCallback(self._connection_lost)
        return connection

    def _retry_delay(self, attempt: int) -> float:
        # ClientService counts failed TCP connects only, and a refused login follows a
        # successful one: count every attempt that did not end up consuming instead.
        # ClientService(prepareConnection=...) would count them, but in Twisted 26.10 a
        # connection that closes before its preparation succeeded (as a refused one does)
        # is an unhandled automat.NoTransition, logged as an error on every attempt.
        return self._backoff(self._failed_attempts)

    def _connect_failed(self, reason: Failure) -> None:
        if reason.check(CancelledError) or self._stopping:
            # stopService cancelled the attempt. A cancelled name resolution fails with
            # DNSLookupError (HostnameEndpoint turns every resolution failure into one):
            # only the stop tells it apart from a real one.
            return
        self._failed_attempts += 1
        self.log.warn(
            "cannot connect to RabbitMQ at {address}: {reason}; retrying",
            address=self._nodes.address,
            reason=reason.getErrorMessage(),
        )

    @property
    def behind(self) -> str | None:
        """Why the consumer is not at the stream's tail yet, or None (readiness)."""
        if self._verifying_at is not None:
            return "checking its position after reconnecting"
        if not self._caught_up:
            return "reading back"
        return None

    def _connection_ready(self, connection: _StreamConnection) -> None:
        self._connection = connection
        self._start_consuming(connection)

    def _start_consuming(self, connection: _StreamConnection) -> None:
        consuming = Deferred.fromCoroutine(self._consume(connection))
        consuming.addErrback(
            lambda reason: connection.abandon(
                f"cannot consume {self._queue}: {_describe_amqp_failure(reason)}"
            )
        )

    async def _consume(self, connection: _StreamConnection) -> None:
        if self.last_offset is not None and not await self._queue_exists(connection):
            self._new_stream(f"queue {self._queue} no longer exists")
        if self._super_stream is not None:
            problem = await self._super_stream.declare(connection)
            if problem is not None:
                self._give_up(problem)
                return
        channel: TwistedChannel = await connection.channel()
        try:
            await channel.queue_declare(
                queue=self._queue, durable=True, arguments=self._queue_arguments
            )
            channel.close()
        except ChannelClosedByBroker as error:
            if error.reply_code != _PRECONDITION_FAILED:
                raise
            if "x-queue-type" in error.reply_text:
                self._give_up(
                    f"RabbitMQ queue {self._queue!r} exists as a non-stream queue "
                    f"({error.reply_text}): delete it or set SSE_RABBITMQ_QUEUE_NAME to "
                    f"another name"
                )
                return
            # Only a stream can hold the other stream arguments (x-max-age), so this is a
            # stream that someone declared with other retention: the setting only applies
            # to a stream we create.
            self.log.warn(
                "queue {queue} exists with other arguments ({reason}); consuming it as it is",
                queue=self._queue,
                reason=error.reply_text,
            )
        probe = await self._attach_probe(connection)
        offset = self._resume_point()
        # Closed or not, the channel still leads to the pika connection it belonged to.
        consumer = await self._consume_on(channel.connection, offset)
        self.consuming = True
        self._failed_attempts = 0
        self.log.info(
            "consuming {queue} at {address} from offset {offset}",
            queue=self._queue,
            address=self._nodes.address,
            offset=str(offset),  # may be a datetime, which JSON log lines cannot hold
        )
        if self._caught_up:
            connection.pace_reads()  # a reconnection: live at once
        else:
            self._wait_for_quiet()
        probe.addCallbacks(self._probed, lambda _: None, callbackArgs=(consumer,))

    async def _consume_on(
        self, connection: pika.connection.Connection, offset: int | str | datetime
    ) -> pika.channel.Channel:
        """Consume the stream from ``offset`` on a new channel; return it once consuming.

        A channel of pika's callback API (``pika.channel.Channel``, opened through the
        connection the Twisted adapter drives, all public API), not a L{TwistedChannel}: its
        ``basic_consume`` would hand every delivery through a Deferred queue, a third of the
        CPU of a message that no stream here wants. Checked against pika 1.4.4; the calls
        relied on are guarded by tests/test_pika_internals.py.
        """
        step: Deferred[Any] = Deferred()

        def closed(channel: pika.channel.Channel, reason: Exception) -> None:
            if not step.called:
                step.errback(reason)
            self._consumer_ended(channel, reason)

        def consuming(frame: pika.frame.Method[pika.spec.Basic.ConsumeOk]) -> None:
            # Before the first delivery, which may follow in the same read.
            self._channel = channel
            step.callback(frame)

        channel = connection.channel(on_open_callback=step.callback)
        channel.add_on_close_callback(closed)
        await step
        step = Deferred()
        # Streams refuse consumers without a prefetch limit.
        channel.basic_qos(prefetch_count=self._prefetch, callback=step.callback)
        await step
        step = Deferred()
        channel.add_on_cancel_callback(lambda _: self._consumer_ended(channel, ConsumerCancelled()))
        # Streams refuse automatic acks with 540 NOT_IMPLEMENTED, closing the connection.
        channel.basic_consume(
            self._queue,
            self._deliver,
            auto_ack=False,
            arguments={"x-stream-offset": offset},
            callback=consuming,
        )
        await step
        return channel

    async def _attach_probe(self, connection: _StreamConnection) -> Deferred[ReceivedMessage]:
        # Attached before the main consumer: whatever it sees was published after that.
        # On its own channel, closed after one delivery: cancelling a consumer makes pika
        # reject what still arrives for it, and streams answer a reject by closing the
        # connection.
        channel: TwistedChannel = await connection.channel()
        self._probe_channel = channel
        await channel.basic_qos(prefetch_count=1)
        probe, _ = await channel.basic_consume(
            queue=self._queue, auto_ack=False, arguments={"x-stream-offset": "next"}
        )
        first: Deferred[ReceivedMessage] = probe.get()

        def close(message: ReceivedMessage) -> ReceivedMessage:
            if channel.is_open:
                channel.close()
            return message

        return first.addCallback(close)

    async def _queue_exists(self, connection: _StreamConnection) -> bool:
        channel: TwistedChannel = await connection.channel()
        try:
            await channel.queue_declare(queue=self._queue, passive=True)
        except ChannelClosedByBroker as error:
            # Also 404 while a restarted broker has not yet brought a durable queue back
            # ("home node ... is down or inaccessible"): that one is retried, not new.
            if error.reply_code == _NOT_FOUND and error.reply_text.startswith(
                "NOT_FOUND - no queue"
            ):
                return False
            raise
        channel.close()
        return True

    def _resume_point(self) -> int | str | datetime:
        if self.last_offset is not None:
            # Attached at the last offset handled, not after it: it must come again, the
            # same, or the queue is another stream than the one consumed so far.
            self._verifying_at = self.last_offset
            return self.last_offset
        if self._from_first:
            return "first"
        if self._first_attached_at is None:
            # Read back the replay window, so that a fresh instance can replay it too.
            start = int(self._reactor.seconds()) - self._read_back_seconds
            self._first_attached_at = datetime.fromtimestamp(start, UTC)
            return self._first_attached_at if self._read_back_seconds else "next"
        # Nothing handled yet, but messages may have arrived while we were away: attach at
        # the time of the first attachment. Being chunk-grained, this may also bring a few
        # messages from just before it.
        return self._first_attached_at

    def _give_up(self, reason: str) -> None:
        stopped = Deferred.fromCoroutine(self._shut_down())
        # From a fresh stack: this fires inside ClientService's stopping, which may not be
        # re-entered, and the callee may well stop this service.
        stopped.addCallback(lambda _: self._reactor.callLater(0, self._on_fatal, reason))

    def _probed(self, message: ReceivedMessage, consumer: pika.channel.Channel) -> None:
        # One delivery tells all the probe can: the first offset published after attaching.
        if consumer is not self._channel:
            return
        first_new: int = message.properties.headers["x-stream-offset"]
        if self._verifying_at is not None and first_new <= self._verifying_at:
            self._restart_at_new_stream(
                f"the first offset published since reconnecting, {first_new}, is not past "
                f"the last one consumed, {self._verifying_at}"
            )
        elif not self._caught_up and self._tail is None:
            self._tail_known(first_new - 1)

    def _wait_for_quiet(self) -> None:
        if self._tail is not None:
            return  # the probe told the tail: the read-back ends there
        if self._quiet is not None and self._quiet.active():
            self._quiet.reset(_QUIET_SECONDS)
        else:
            self._quiet = self._reactor.callLater(_QUIET_SECONDS, self._quiet_passed)

    def _quiet_passed(self) -> None:
        self._quiet = None
        if self._caught_up or self._tail is not None:
            return
        # Nothing published since attaching, and nothing more to read back.
        if self.last_offset is not None:
            self._tail_known(self.last_offset)
        elif self._connection is not None and self._channel is not None:
            # Nothing read back at all: the newest message, if any, is older than the
            # window. Its offset is still the tail, which tells a browser resuming at it
            # from one that missed events.
            looking = Deferred.fromCoroutine(self._newest_at_rest(self._connection))
            looking.addCallback(self._rested, self._channel)
            looking.addErrback(
                lambda reason: self.log.warn(
                    "cannot read the newest offset of {queue}: {reason}",
                    queue=self._queue,
                    reason=_describe_amqp_failure(reason),
                )
            )

    async def _newest_at_rest(self, connection: _StreamConnection) -> int:
        """The offset of the newest message in the stream (-1 when it is empty), read from
        its last chunk; only meant for a stream nobody publishes to just now."""
        channel: TwistedChannel = await connection.channel()
        await channel.basic_qos(prefetch_count=self._prefetch)
        deliveries, _ = await channel.basic_consume(
            queue=self._queue, auto_ack=False, arguments={"x-stream-offset": "last"}
        )
        newest = -1
        # The broker sends the last chunk at once; the first wait also covers an empty stream.
        wait = _QUIET_SECONDS
        while True:
            arriving: Deferred[ReceivedMessage] = deliveries.get()
            arriving.addTimeout(wait, self._reactor)
            try:
                message = await arriving
            except DeferredTimeoutError:
                break
            newest = max(newest, message.properties.headers["x-stream-offset"])
            channel.basic_ack(message.method.delivery_tag)
            wait = _CHUNK_SETTLE_SECONDS
        if channel.is_open:
            channel.close()
        return newest

    def _rested(self, newest: int, consumer: pika.channel.Channel) -> None:
        if consumer is not self._channel or self._caught_up or self._tail is not None:
            return  # the stream was replaced, or the probe told the tail meanwhile
        nothing_read = self.last_offset is None
        if nothing_read and self._live is not None:
            self._live.nothing_read_back(newest)
        self._tail_known(newest)
        if nothing_read and not self._caught_up:
            self._finish_read_back()
        # Otherwise a read-back slower to start than the quiet period is under way: it
        # ends when it reaches the tail.

    def _cancel_quiet(self) -> None:
        if self._quiet is not None and self._quiet.active():
            self._quiet.cancel()
        self._quiet = None

    def _tail_known(self, tail: int) -> None:
        self._tail = tail
        self._cancel_quiet()
        if self._live is not None:
            self._live.tail_known(tail)
        if tail < 0 or (self.last_offset is not None and self.last_offset >= tail):
            self._finish_read_back()

    def _finish_read_back(self) -> None:
        self._caught_up = True
        self._cancel_quiet()
        if self._connection is not None:
            self._connection.pace_reads()
        self.log.info(
            "read back {queue} up to offset {tail}: what follows is live",
            queue=self._queue,
            tail=self._tail,
        )
        if self._live is not None:
            self._live.caught_up()

    def _new_stream(self, reason: str) -> None:
        self.log.error(
            "{queue} is a new stream ({reason}): consuming it from its first message; "
            "replay window cleared, every open stream sent a reset",
            queue=self._queue,
            reason=reason,
            previous_offset=self.last_offset,
        )
        previous = self.last_offset
        self.last_offset = None
        self._last_body = b""
        self._verifying_at = None
        self._tail = None
        self._caught_up = False
        self._from_first = True
        self._cancel_quiet()
        if self._live is not None:
            self._live.new_stream(previous)

    def _restart_at_new_stream(self, reason: str) -> None:
        self._new_stream(reason)
        self._flush_acks()
        channels = (self._channel, self._probe_channel)
        self._channel = self._probe_channel = None
        self.consuming = False
        for channel in channels:
            if channel is not None and channel.is_open:
                channel.close()
        if self._connection is not None:
            self._start_consuming(self._connection)

    def _deliver(
        self,
        channel: pika.channel.Channel,
        method: pika.spec.Basic.Deliver,
        properties: pika.spec.BasicProperties,
        body: bytes,
    ) -> None:
        if channel is not self._channel:
            return  # from the consumer of a stream that was replaced
        offset: int = properties.headers["x-stream-offset"]
        if self._verifying_at is not None and offset >= self._verifying_at:
            if offset != self._verifying_at or body != self._last_body:
                self._restart_at_new_stream(
                    f"offset {self._verifying_at} no longer holds the message consumed there"
                )
                return
            self._verifying_at = None
        # A resumed consumer may be sent the chunk holding its start offset from the top.
        elif self.last_offset is None or offset > self.last_offset:
            self._handle(body, properties, offset)
        self._acknowledge(method.delivery_tag)

    def _handle(self, body: bytes, properties: pika.spec.BasicProperties, offset: int) -> None:
        written: object = 0
        try:
            written = self._on_message(body, offset)
        except Exception:
            self.log.failure("on_message failed at offset {offset}", offset=offset)
        self.last_offset = offset
        # A reference, not a copy: what a reconnection compares the same offset with.
        self._last_body = body
        # Once per message, however many streams it reached.
        self._metrics.messages_consumed.inc()
        if isinstance(written, int):
            published_at = amqp_timestamp_seconds(properties.timestamp)
            self._metrics.delivered(written, published_at, self._reactor.seconds())
        if not self._caught_up:
            if self._tail is not None and offset >= self._tail:
                self._finish_read_back()
            else:
                self._wait_for_quiet()

    def _consumer_ended(self, channel: pika.channel.Channel, reason: Exception) -> None:
        if channel is not self._channel:
            return  # the consumer of a stream that was replaced, or not consuming yet
        self.consuming = False
        if self._connection is not None:
            # A fresh connection redeclares the queue and attaches a new consumer.
            self._connection.abandon(
                f"consumer of {self._queue} ended: {_describe_amqp_failure(Failure(reason))}"
            )

    def _acknowledge(self, delivery_tag: int) -> None:
        # Acks on a stream free no message, only prefetch credit. One multiple=True ack per
        # half window, or _ACK_SECONDS after the first unacknowledged delivery when fewer
        # arrive, keeps the broker sending without costing a frame and a write for every
        # message, nor for every reactor turn of a paced stream.
        self._last_delivery_tag = delivery_tag
        self._unacked += 1
        if self._unacked >= self._ack_batch:
            self._flush_acks()
        elif self._ack_call is None:
            # On the tick grid, so that the acks share a wake-up with the stall tick.
            delay = delay_to_tick_by(self._reactor.seconds(), _ACK_SECONDS)
            self._ack_call = self._reactor.callLater(delay, self._flush_acks)

    def _flush_acks(self) -> None:
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None
        if self._unacked and self._channel is not None and self._channel.is_open:
            self._channel.basic_ack(self._last_delivery_tag, multiple=True)
        self._unacked = 0

    def _connection_lost(self, reason: str) -> None:
        # Not self.consuming: pika ends the consumer just before it reports the connection lost.
        was_consuming = self._channel is not None
        self.consuming = False
        self._connection = None
        self._channel = None
        self._cancel_quiet()  # restarted once consuming again
        self._flush_acks()  # the channel is gone: this only forgets what was pending
        if self._stopping:
            return
        if was_consuming:
            self.log.warn(
                "lost RabbitMQ connection {address} while consuming {queue}: {reason}; "
                "reconnecting",
                address=self._nodes.address,
                queue=self._queue,
                reason=reason,
            )
            return
        self._failed_attempts += 1
        self.log.warn(
            "RabbitMQ connection {address} ended before consuming {queue}: {reason}; retrying",
            address=self._nodes.address,
            queue=self._queue,
            reason=reason,
        )
