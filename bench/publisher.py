"""The bench's publisher, a process of its own: ``python -m bench.publisher --queue Q ...``.

Publishes ``foundcontract`` messages, message ``i`` to user ``i % len(users)``, each carrying
two extra fields the server passes through: ``seq`` (``i``) and ``sent`` (CLOCK_MONOTONIC in
nanoseconds, which every process of the machine shares, taken just before the publish).
Without ``--rate`` it publishes flat out; with it, at that pace. A ``--hot-user`` also gets
``--hot-rate`` large messages a second, for the slow-client check of S3.

A client library costs 50-90 µs of CPU per publish here (pika, aiormq), which would make the
publisher, not the server, the bottleneck of S2: this one speaks AMQP 0-9-1 on a blocking
socket with pika's frame codec, marshals the unchanging frames once, and writes messages in
batches. Prints one JSON line: when publishing began and ended, and its own CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import time
from pathlib import Path

import pika.frame
import pika.spec

__all__ = ["RawPublisher"]

_TEMPLATE = (
    '{"type":"foundcontract","userid":"%s","filename":"report.pdf",'
    '"filepath":"/contracts/report.pdf","finished":false,"seq":%d,"sent":%d}'
)
_HOT_TEMPLATE = (
    '{"type":"foundcontract","userid":"%s","filename":"report.pdf",'
    '"filepath":"/contracts/report.pdf","finished":false,"seq":-1,"padding":"%s"}'
)
_CHANNEL = 1
_FRAME_END = b"\xce"
_BATCH = 200


class RawPublisher:
    """A minimal blocking AMQP publisher on channel 1 (no confirms, no heartbeats)."""

    def __init__(self, host: str, port: int, username: str, password: str, vhost: str) -> None:
        self._socket = socket.create_connection((host, port))
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""
        self._socket.sendall(b"AMQP\x00\x00\x09\x01")
        self._expect(pika.spec.Connection.Start)
        self._send(
            0,
            pika.spec.Connection.StartOk(
                client_properties={"product": "sse-twisted bench"},
                mechanism="PLAIN",
                response=f"\0{username}\0{password}",
            ),
        )
        tune = self._expect(pika.spec.Connection.Tune)
        self._send(
            0,
            pika.spec.Connection.TuneOk(
                channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
            ),
        )
        self._send(0, pika.spec.Connection.Open(virtual_host=vhost))
        self._expect(pika.spec.Connection.OpenOk)
        self._send(_CHANNEL, pika.spec.Channel.Open())
        self._expect(pika.spec.Channel.OpenOk)
        self._properties = pika.spec.BasicProperties(delivery_mode=1)
        self._headers: dict[int, bytes] = {}
        self._method = b""

    def _send(self, channel: int, method: pika.spec.amqp_object.Method) -> None:
        self._socket.sendall(pika.frame.Method(channel, method).marshal())

    def _expect(self, kind: type) -> pika.spec.amqp_object.Method:
        while True:
            consumed, frame = pika.frame.decode_frame(self._buffer)
            if frame is None:
                data = self._socket.recv(65536)
                if not data:
                    raise ConnectionError("broker closed the connection")
                self._buffer += data
                continue
            self._buffer = self._buffer[consumed:]
            if isinstance(frame, pika.frame.Method):
                if isinstance(frame.method, kind):
                    return frame.method
                if isinstance(frame.method, pika.spec.Channel.Close | pika.spec.Connection.Close):
                    raise ConnectionError(f"broker closed: {frame.method}")

    def check_queue(self, queue: str) -> None:
        """Fail unless ``queue`` exists: the default exchange drops what no queue takes."""
        self._send(_CHANNEL, pika.spec.Queue.Declare(queue=queue, passive=True))
        self._expect(pika.spec.Queue.DeclareOk)
        self._method = pika.frame.Method(
            _CHANNEL, pika.spec.Basic.Publish(exchange="", routing_key=queue)
        ).marshal()

    def frames(self, body: bytes) -> bytes:
        """The three frames that publish ``body`` (after L{check_queue})."""
        return self.publish_frames(self._method, body)

    def publish_frames(self, method: bytes, body: bytes) -> bytes:
        """The marshalled publish ``method`` frame, then ``body``'s header and body frames."""
        size = len(body)
        header = self._headers.get(size)
        if header is None:
            header = self._headers[size] = pika.frame.Header(
                _CHANNEL, size, self._properties
            ).marshal()
        return method + header + struct.pack(">BHI", 3, _CHANNEL, size) + body + _FRAME_END

    def write(self, data: bytes) -> None:
        """Send marshalled frames."""
        self._socket.sendall(data)

    def sync(self) -> None:
        """A round trip: the broker has read every publish sent before it."""
        self._send(_CHANNEL, pika.spec.Basic.Qos(prefetch_count=0))
        self._expect(pika.spec.Basic.QosOk)

    def finish(self, started: float, cpu_before: float, count: int) -> dict[str, float]:
        """Wait until the broker has taken every message, then close: the summary's timing
        (``count`` messages published since ``started``, with this process's CPU since
        ``cpu_before``)."""
        self.sync()
        ended = time.monotonic()
        cpu = sum(os.times()[:2]) - cpu_before
        self.close()
        return {
            "started": started,
            "ended": ended,
            "publish_rate": count / max(ended - started, 1e-9),
            "cpu_seconds": round(cpu, 3),
        }

    def close(self) -> None:
        """Close the connection politely."""
        self._send(
            0, pika.spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0)
        )
        self._expect(pika.spec.Connection.CloseOk)
        self._socket.close()


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.publisher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--users", type=Path, required=True, help="one userid a line")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="messages/s; 0 = flat out")
    parser.add_argument("--hot-user", default="")
    parser.add_argument("--hot-rate", type=float, default=0.0)
    parser.add_argument("--hot-bytes", type=int, default=8192)
    return parser.parse_args()


def publish(options: argparse.Namespace) -> dict[str, float | int]:
    """Publish as ``options`` say; return the summary."""
    users = options.users.read_text().split()
    publisher = RawPublisher(options.host, options.port, "guest", "guest", "/")
    publisher.check_queue(options.queue)
    hot = b""
    if options.hot_user:
        hot = publisher.frames(
            (_HOT_TEMPLATE % (options.hot_user, "x" * options.hot_bytes)).encode()
        )
    cpu_before = sum(os.times()[:2])
    started = time.monotonic()
    hot_sent = 0
    if not options.rate:
        for first in range(0, options.count, _BATCH):
            publisher.write(
                b"".join(
                    publisher.frames(
                        (_TEMPLATE % (users[seq % len(users)], seq, time.monotonic_ns())).encode()
                    )
                    for seq in range(first, min(first + _BATCH, options.count))
                )
            )
    else:
        for seq in range(options.count):
            delay = started + seq / options.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if hot:
                due = int((time.monotonic() - started) * options.hot_rate)
                while hot_sent < due:
                    publisher.write(hot)
                    hot_sent += 1
            body = (_TEMPLATE % (users[seq % len(users)], seq, time.monotonic_ns())).encode()
            publisher.write(publisher.frames(body))
    return {
        "count": options.count,
        "hot_messages": hot_sent,
        **publisher.finish(started, cpu_before, options.count),
    }


def main() -> None:
    """Publish, then print the JSON summary line."""
    print(json.dumps(publish(_arguments())), flush=True)


if __name__ == "__main__":
    main()
