"""Partitioned streams: which partition a user lives in, the event ids of a partition, and
the RabbitMQ super stream layout that holds them.

A user lives in partition ``crc32(userid.lower().encode("ascii")) % P``, where ``crc32`` is
the CRC-32 of IEEE 802.3 (also called CRC-32/ISO-HDLC, what zlib, Python's ``zlib.crc32``,
Go's ``hash/crc32.ChecksumIEEE``, Node's ``zlib.crc32`` and PHP's ``crc32`` compute):
polynomial 0x04C11DB7 taken bit-reflected (0xEDB88320), register initialised to 0xFFFFFFFF,
final value complemented, as an unsigned 32-bit number (``crc32(b"123456789")`` is
0xCBF43926). HAProxy's ``crc32`` converter without its ``avalanche`` argument computes the
same number, so a load balancer routes ``/subscribe/{topic}/{userid}/...`` with
``path,field(4,/),lower,crc32,mod(P)`` (tests/test_partitions_haproxy.py checks it).

With P = 1 nothing changes: one stream queue named after the stream, event ids that are
plain offsets. With P > 1 the messages live in RabbitMQ's super stream layout, what
``rabbitmq-streams add_super_stream <stream> --partitions P`` creates: a durable direct
exchange named after the stream (argument ``x-super-stream: true``), stream queues
``<stream>-0`` ... ``<stream>-<P-1>`` (``x-queue-leader-locator: balanced``), each bound
with the routing key ``"k"`` and the binding argument ``x-stream-partition-order: k``. A
publisher sends a user's message to the exchange with its partition as routing key.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pika.adapters.twisted_connection import TwistedChannel, TwistedProtocolConnection
from pika.exceptions import ChannelClosedByBroker
from twisted.internet.defer import Deferred, DeferredLock

__all__ = ["SINGLE", "Partition", "SuperStream", "partition_of"]

_NOT_FOUND = 404
_PRECONDITION_FAILED = 406
_OFFSET = re.compile(r"-1|[0-9]{1,19}")


def partition_of(userid: str, partitions: int) -> int:
    """The partition (0 to ``partitions`` - 1) of ``userid``: CRC-32 (IEEE) of its lowercase
    ASCII bytes, modulo ``partitions``. A userid that is not ASCII is no v4 UUID, and the
    server never looks it up."""
    return zlib.crc32(userid.lower().encode("ascii")) % partitions


@dataclass(frozen=True, slots=True)
class Partition:
    """Partition ``number`` of a stream split in ``count``: whose users it holds, and how
    its offsets are written as event ids.

    With ``count`` 1 an id is the offset itself. Otherwise it is ``<count>-<number>-<offset>``
    (``4-2-1187``; the offset may be -1, "before offset 0"), so that an id written under
    another layout (another count, a user now in another partition) is not an offset here,
    and a browser resuming with it gets a ``reset``, never a wrong position.
    """

    count: int
    number: int

    def holds(self, userid: str) -> bool:
        """Whether ``userid`` lives in this partition."""
        return self.count == 1 or partition_of(userid, self.count) == self.number

    def event_id(self, offset: int) -> int | str:
        """The event id of ``offset`` (an int when it is the offset itself)."""
        if self.count == 1:
            return offset
        return f"{self.count}-{self.number}-{offset}"

    def offset_of(self, event_id: str) -> int | None:
        """The offset an event id of this partition names; None for any other text."""
        if self.count > 1:
            prefix = f"{self.count}-{self.number}-"
            if not event_id.startswith(prefix):
                return None
            event_id = event_id[len(prefix) :]
        if not event_id.isascii() or not _OFFSET.fullmatch(event_id):
            return None
        return int(event_id)

    def queue(self, stream: str) -> str:
        """The stream queue of this partition of ``stream``."""
        return stream if self.count == 1 else f"{stream}-{self.number}"


SINGLE = Partition(1, 0)
"""The one partition of an unpartitioned stream: ids are plain offsets."""


class SuperStream:
    """The super stream layout of ``name`` in ``count`` partitions, declared when missing.

    L{declare} refuses (returns one line) what cannot be this layout: a partition beyond
    ``count`` (``<name>-<count>`` exists: the stream has more partitions), a partition that
    is not a stream queue, an exchange of another type. A missing partition is declared
    and bound, as a deleted stream queue is declared again (the consumer then treats it as
    a new stream). What it cannot see over AMQP 0-9-1: bindings someone added by hand.
    """

    def __init__(self, name: str, count: int, queue_arguments: Mapping[str, Any]) -> None:
        self.name = name
        self.count = count
        self.queue_arguments = {**queue_arguments, "x-queue-leader-locator": "balanced"}
        # The check for a partition too many answers with a 404, which pika logs as a
        # warning: made once per process, not by every consumer at every connection.
        self._checking = DeferredLock()
        self._checked = False

    def partitions(self) -> list[str]:
        """The partition queues, in order."""
        return [Partition(self.count, number).queue(self.name) for number in range(self.count)]

    async def declare(self, connection: TwistedProtocolConnection) -> str | None:
        """Declare what is missing of the layout; the reason it cannot be, or None."""
        problem = await self._checking.run(
            lambda: Deferred.fromCoroutine(self._partition_too_many(connection))
        )
        if problem is not None:
            return problem
        channel: TwistedChannel = await connection.channel()
        for queue in self.partitions():
            try:
                await channel.queue_declare(
                    queue=queue, durable=True, arguments=self.queue_arguments
                )
            except ChannelClosedByBroker as error:
                if error.reply_code != _PRECONDITION_FAILED:
                    raise
                if "x-queue-type" in error.reply_text:
                    return (
                        f"RabbitMQ queue {queue!r} exists as a non-stream queue "
                        f"({error.reply_text}): delete it or set SSE_RABBITMQ_QUEUE_NAME to "
                        f"another name"
                    )
                # A stream declared with other retention: consumed as it is.
                channel = await connection.channel()
        try:
            await channel.exchange_declare(
                exchange=self.name,
                exchange_type="direct",
                durable=True,
                arguments={"x-super-stream": True},
            )
        except ChannelClosedByBroker as error:
            if error.reply_code != _PRECONDITION_FAILED:
                raise
            return (
                f"RabbitMQ exchange {self.name!r} exists and is not a super stream's direct "
                f"exchange ({error.reply_text}): delete it or set SSE_RABBITMQ_QUEUE_NAME to "
                f"another name"
            )
        for number, queue in enumerate(self.partitions()):
            await channel.queue_bind(
                queue=queue,
                exchange=self.name,
                routing_key=str(number),
                arguments={"x-stream-partition-order": number},
            )
        channel.close()
        return None

    async def _partition_too_many(self, connection: TwistedProtocolConnection) -> str | None:
        if self._checked:
            return None
        beyond = Partition(self.count + 1, self.count).queue(self.name)
        if await _exists(connection, queue=beyond):
            return (
                f"RabbitMQ super stream {self.name!r} has more partitions than "
                f"SSE_RABBITMQ_PARTITIONS={self.count} ({beyond!r} exists): set the number "
                f"it was made with, or delete it"
            )
        self._checked = True
        return None


async def _exists(
    connection: TwistedProtocolConnection, *, queue: str | None = None, exchange: str | None = None
) -> bool:
    """Whether the queue (or exchange) exists: a passive declaration, on a channel of its
    own (a 404 closes the channel)."""
    channel: TwistedChannel = await connection.channel()
    try:
        if queue is not None:
            await channel.queue_declare(queue=queue, passive=True)
        else:
            await channel.exchange_declare(exchange=exchange, passive=True)
    except ChannelClosedByBroker as error:
        if error.reply_code == _NOT_FOUND:
            return False
        raise
    channel.close()
    return True
