"""The fleet scenario's publisher, a process of its own: ``python -m bench.fleet_publisher``.

Publishes to a super stream as the partitioned mode's publishers do: to its exchange, with
the user's partition (``sse_twisted._partitions.partition_of``) as routing key. Message
``i`` goes to user ``i % len(users)`` with ``seq`` ``i``, at ``--rate`` messages a second
(sent in 10 ms batches); then one sentinel per partition, ``seq`` ``count + p``, to that
partition's user in ``--sentinels``, so that the bench knows when every instance has read
its partitions to the end (a stream queue keeps order). Prints one JSON line: when
publishing began and ended, the messages of each partition (sentinels included), own CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pika.frame
import pika.spec

from sse_twisted._partitions import partition_of

from .publisher import _CHANNEL, RawPublisher

__all__ = ["PartitionPublisher"]

_TEMPLATE = (
    '{"type":"foundcontract","userid":"%s","filename":"report.pdf",'
    '"filepath":"/contracts/report.pdf","finished":false,"seq":%d,"sent":%d}'
)
_TICK_SECONDS = 0.01


class PartitionPublisher(RawPublisher):
    """L{RawPublisher} to a super stream's exchange, routed by partition."""

    def route(self, exchange: str, partitions: int) -> None:
        """Fail unless ``exchange`` exists; marshal the publish frame of each partition."""
        self._send(_CHANNEL, pika.spec.Exchange.Declare(exchange=exchange, passive=True))
        self._expect(pika.spec.Exchange.DeclareOk)
        self._methods = [
            pika.frame.Method(
                _CHANNEL, pika.spec.Basic.Publish(exchange=exchange, routing_key=str(number))
            ).marshal()
            for number in range(partitions)
        ]

    def frames_to(self, partition: int, body: bytes) -> bytes:
        """The three frames that publish ``body`` to ``partition`` (after L{route})."""
        return self.publish_frames(self._methods[partition], body)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet_publisher")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5672)
    parser.add_argument("--exchange", required=True, help="the super stream")
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--users", type=Path, required=True, help="one userid a line")
    parser.add_argument("--sentinels", type=Path, required=True, help="a userid per partition")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="messages/s")
    return parser.parse_args()


def publish(options: argparse.Namespace) -> dict[str, object]:
    """Publish as ``options`` say; return the summary."""
    users = options.users.read_text().split()
    sentinels = options.sentinels.read_text().split()
    partitions = options.partitions
    routes = [partition_of(userid, partitions) for userid in users]
    per_partition = [0] * partitions
    publisher = PartitionPublisher(options.host, options.port, "guest", "guest", "/")
    publisher.route(options.exchange, partitions)
    cpu_before = sum(os.times()[:2])
    started = time.monotonic()
    sent = 0
    while sent < options.count:
        due = min(options.count, int((time.monotonic() - started) * options.rate) + 1)
        batch = []
        for seq in range(sent, due):
            user = seq % len(users)
            per_partition[routes[user]] += 1
            body = (_TEMPLATE % (users[user], seq, time.monotonic_ns())).encode()
            batch.append(publisher.frames_to(routes[user], body))
        if batch:
            publisher.write(b"".join(batch))
        sent = due
        time.sleep(_TICK_SECONDS)
    for number, userid in enumerate(sentinels):
        assert partition_of(userid, partitions) == number, "a sentinel of the wrong partition"
        per_partition[number] += 1
        body = (_TEMPLATE % (userid, options.count + number, time.monotonic_ns())).encode()
        publisher.write(publisher.frames_to(number, body))
    return {
        "count": options.count + len(sentinels),
        "per_partition": per_partition,
        **publisher.finish(started, cpu_before, options.count),
    }


def main() -> None:
    """Publish, then print the JSON summary line."""
    print(json.dumps(publish(_arguments())), flush=True)


if __name__ == "__main__":
    main()
