"""The ceiling: a bare pika consumer of a stream queue, ``python -m bench.ceiling --queue Q``.

It consumes and acknowledges, nothing else, with the server's queue settings (durable stream
queue, ``basic_qos`` prefetch, manual acks, one ``multiple=True`` ack per half window). Two
adapters: ``select`` (pika's own loop: the practical ceiling of any Python consumer) and
``twisted`` (pika's Twisted adapter, read the way the server reads it: a Deferred per message
from its ``ClosableDeferredQueue``), which tells the adapter's share of the server's cost.

Prints ``{"ready": true}`` once consuming from the next offset, then a JSON summary once
``--count`` messages have arrived: first/last arrival, own CPU, and, with ``--latency``,
publish-to-receive latencies from the ``sent`` field.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import pika
from pika.adapters.select_connection import SelectConnection

_SENT_FIELD = b'"sent":'


class Tally:
    """What the consumer saw: message count, first/last arrival, latencies, CPU."""

    def __init__(self, count: int, latency: bool) -> None:
        self.wanted = count
        self.latency = latency
        self.received = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.latencies_ns: list[int] = []
        self.cpu_at_ready = 0.0

    def ready(self) -> None:
        self.cpu_at_ready = sum(os.times()[:2])
        print(json.dumps({"ready": True}), flush=True)

    def message(self, body: bytes) -> bool:
        """Count one message; True once all have arrived."""
        now = time.monotonic_ns()
        if self.latency:
            start = body.find(_SENT_FIELD)
            if start >= 0:
                start += len(_SENT_FIELD)
                end = body.find(b"}", start)
                self.latencies_ns.append(now - int(body[start:end]))
        if not self.received:
            self.first_at = now / 1e9
        self.last_at = now / 1e9
        self.received += 1
        return self.received >= self.wanted

    def summary(self, adapter: str) -> dict[str, Any]:
        cpu = sum(os.times()[:2]) - self.cpu_at_ready
        return {
            "adapter": adapter,
            "received": self.received,
            "first_at": self.first_at,
            "last_at": self.last_at,
            "cpu_seconds": round(cpu, 3),
            "latencies_ns": self.latencies_ns,
        }


def _queue_arguments() -> dict[str, Any]:
    return {"x-queue-type": "stream", "x-max-age": "1D"}


def run_select(options: argparse.Namespace, tally: Tally) -> None:
    """pika's SelectConnection: callbacks, no Deferreds."""
    ack_batch = max(1, options.prefetch // 2)
    state = {"unacked": 0}

    def on_message(channel: Any, method: Any, properties: Any, body: bytes) -> None:
        done = tally.message(body)
        state["unacked"] += 1
        if state["unacked"] >= ack_batch or done:
            channel.basic_ack(method.delivery_tag, multiple=True)
            state["unacked"] = 0
        if done:
            channel.connection.close()

    def on_qos(frame: Any, channel: Any) -> None:
        channel.basic_consume(
            options.queue,
            lambda *args: on_message(*args),
            auto_ack=False,
            arguments={"x-stream-offset": "next"},
            callback=lambda _: tally.ready(),
        )

    def on_declared(frame: Any, channel: Any) -> None:
        channel.basic_qos(prefetch_count=options.prefetch, callback=lambda f: on_qos(f, channel))

    def on_channel(channel: Any) -> None:
        channel.queue_declare(
            options.queue,
            durable=True,
            arguments=_queue_arguments(),
            callback=lambda f: on_declared(f, channel),
        )

    connection = SelectConnection(
        pika.ConnectionParameters("127.0.0.1", options.port),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, reason: c.ioloop.stop(),
    )
    connection.ioloop.start()


def run_twisted(options: argparse.Namespace, tally: Tally) -> None:
    """pika's Twisted adapter, read through a Deferred per message as the server does."""
    from pika.adapters.twisted_connection import TwistedProtocolConnection
    from twisted.internet import defer, protocol, reactor

    ack_batch = max(1, options.prefetch // 2)

    async def consume(connection: TwistedProtocolConnection) -> None:
        channel = await connection.channel()
        await channel.queue_declare(options.queue, durable=True, arguments=_queue_arguments())
        await channel.basic_qos(prefetch_count=options.prefetch)
        messages, _ = await channel.basic_consume(
            queue=options.queue, auto_ack=False, arguments={"x-stream-offset": "next"}
        )
        tally.ready()
        unacked = 0
        pending_flush = [None]

        def flush(tag: int) -> None:
            nonlocal unacked
            pending_flush[0] = None
            if unacked:
                channel.basic_ack(tag, multiple=True)
                unacked = 0

        while True:
            message = await messages.get()
            done = tally.message(message.body)
            unacked += 1
            tag = message.method.delivery_tag
            if unacked >= ack_batch or done:
                flush(tag)
            elif pending_flush[0] is None:
                pending_flush[0] = reactor.callLater(0, flush, tag)
            if done:
                break
        connection.close()
        reactor.callLater(0.2, reactor.stop)

    def connected(connection: TwistedProtocolConnection) -> None:
        connection.ready.addCallback(
            lambda _: defer.Deferred.fromCoroutine(consume(connection))
        ).addErrback(lambda failure: (print(failure), reactor.stop()))

    creator = protocol.ClientCreator(
        reactor, TwistedProtocolConnection, pika.ConnectionParameters()
    )
    creator.connectTCP("127.0.0.1", options.port).addCallback(connected)
    reactor.run()


def main() -> None:
    """Consume ``--count`` messages, then print the summary line."""
    parser = argparse.ArgumentParser(prog="python -m bench.ceiling")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--adapter", choices=("select", "twisted"), default="select")
    parser.add_argument("--latency", action="store_true")
    options = parser.parse_args()
    tally = Tally(options.count, options.latency)
    if options.adapter == "select":
        run_select(options, tally)
    else:
        run_twisted(options, tally)
    print(json.dumps(tally.summary(options.adapter)), flush=True)


if __name__ == "__main__":
    main()
