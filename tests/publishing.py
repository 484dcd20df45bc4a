"""What a producer does to the broker: publish messages to a stream queue (the issue's
example message among them), and delete the queue afterwards."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Mapping
from contextlib import suppress
from typing import Any

import pika
import pika.exceptions
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from tests.waiting import TIMEOUT, bounded


def found_contract(userid: str, **extra: Any) -> dict[str, Any]:
    """The example message of the issue, for ``userid``."""
    return {
        "userid": userid,
        "filename": "report.pdf",
        "filepath": "/x/report.pdf",
        "finished": False,
        "type": "foundcontract",
        **extra,
    }


def delete_queue(port: int, queue: str) -> None:
    """Delete ``queue`` from the broker's plain AMQP ``port``, if it is there: each stream
    queue holds files open in the broker, whose descriptors are few (1,024 by default)."""
    with suppress(pika.exceptions.AMQPError):
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()


def delete_super_stream(port: int, name: str, partitions: int) -> None:
    """Delete the super stream ``name`` from the broker's plain AMQP ``port``: its exchange
    and every partition queue (and one more, which the refusal tests make)."""
    with suppress(pika.exceptions.AMQPError):
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        try:
            channel = connection.channel()
            channel.exchange_delete(name)
            for queue in [name, *(f"{name}-{n}" for n in range(partitions + 1))]:
                channel.queue_delete(queue)
        finally:
            connection.close()


def _publish_blocking(
    parameters: pika.ConnectionParameters,
    queue: str,
    bodies: list[bytes],
    broker_wait_seconds: float = 0,
) -> None:
    deadline = time.monotonic() + broker_wait_seconds
    while True:
        try:
            connection = pika.BlockingConnection(parameters)
            break
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            _publish_until_routed(channel, queue, body)
    finally:
        connection.close()


def _publish_until_routed(channel: Any, queue: str, body: bytes) -> None:
    # Right after a broker restart a stream queue exists but is not routable for a moment,
    # and RabbitMQ gives no signal for when it is: the returned message is the only sign.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            channel.basic_publish("", queue, body, mandatory=True)
            return
        except pika.exceptions.UnroutableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def publish(
    port: int,
    queue: str,
    *messages: Mapping[str, Any] | bytes,
    tls: ssl.SSLContext | None = None,
    broker_wait_seconds: float = 0,
) -> Deferred[None]:
    """Publish to ``queue`` through the default exchange, pretty-printed like the issue's
    example, with publisher confirms; runs the blocking client in a thread.

    With ``broker_wait_seconds``, a broker that refuses connections is tried again for
    that long, as a producer with retries does through an outage."""
    bodies = [
        message if isinstance(message, bytes) else json.dumps(message, indent=2).encode()
        for message in messages
    ]
    parameters = pika.ConnectionParameters(
        host="localhost" if tls else "127.0.0.1",
        port=port,
        ssl_options=pika.SSLOptions(tls, "localhost") if tls else None,
    )
    return bounded(
        deferToThread(_publish_blocking, parameters, queue, bodies, broker_wait_seconds),
        TIMEOUT + broker_wait_seconds,
    )
