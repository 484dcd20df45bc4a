"""The partitions this instance consumes (``SSE_PARTITIONS``), each a consumer of its own
stream queue with its own replay window and live start, all feeding one stream registry.

With one partition this is exactly the unpartitioned server: one consumer, one window.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application.service import MultiService

from ._consumer import StreamConsumerService
from ._live import LiveStart
from ._partitions import partition_of
from ._replay import ReplayWindow

__all__ = [
    "LocalPartition",
    "LocalPartitions",
    "PartitionGauges",
    "PartitionedConsumer",
    "WindowsTotal",
]


@dataclass(frozen=True)
class LocalPartition:
    """One consumed partition: its number, replay window, live start and consumer."""

    number: int
    window: ReplayWindow
    live: LiveStart
    consumer: StreamConsumerService


class PartitionedConsumer(MultiService):
    """The consumers of several partitions, as one: consuming while all of them are, at
    the tail once all of them are (readiness waits for every read-back).

    @ivar last_offset: always None: offsets are per partition (``sse_partition_offset``).
    """

    last_offset: int | None = None

    def __init__(self, consumers: Sequence[tuple[int, StreamConsumerService]]) -> None:
        super().__init__()
        self.consumers = dict(consumers)
        for number, consumer in consumers:
            consumer.setName(f"partition-{number}")
            consumer.setServiceParent(self)

    @property
    def consuming(self) -> bool:
        """Whether every partition's consumer is registered with the broker."""
        return all(consumer.consuming for consumer in self.consumers.values())

    @property
    def behind(self) -> str | None:
        """Why a partition's consumer is not at its tail yet (naming it), or None."""
        for number, consumer in self.consumers.items():
            behind = consumer.behind
            if behind is not None:
                return f"{behind} (partition {number})"
        return None


class LocalPartitions:
    """Which consumed partition serves a userid, if any.

    @ivar count: P, the number of partitions of the stream.
    @ivar numbers: the partitions this instance consumes, in order.
    @ivar consumer: what consumes them: the one consumer, or a L{PartitionedConsumer}.
    """

    def __init__(self, count: int, local: Sequence[LocalPartition]) -> None:
        self.count = count
        self._by_number = {partition.number: partition for partition in local}
        self.numbers = tuple(self._by_number)
        self._only = local[0] if count == 1 else None
        self.consumer: StreamConsumerService | PartitionedConsumer
        if self._only is not None:
            self.consumer = self._only.consumer
        else:
            self.consumer = PartitionedConsumer(
                [(partition.number, partition.consumer) for partition in local]
            )

    def __iter__(self) -> Iterator[LocalPartition]:
        return iter(self._by_number.values())

    def partition_of(self, userid: str) -> int:
        """The partition ``userid`` lives in (0 with one partition)."""
        return 0 if self.count == 1 else partition_of(userid, self.count)

    def of(self, userid: str) -> LocalPartition | None:
        """The consumed partition ``userid`` lives in; None when this instance does not
        consume it (the request was routed to the wrong shard)."""
        if self._only is not None:
            return self._only
        return self._by_number.get(partition_of(userid, self.count))

    def window_of(self, userid: str) -> ReplayWindow | None:
        """The replay window of ``userid``'s partition, if consumed here."""
        partition = self.of(userid)
        return None if partition is None else partition.window

    def describe(self) -> str:
        """The consumed partitions, for log lines: ``0,1``."""
        return ",".join(str(number) for number in self.numbers)


class WindowsTotal:
    """The replay windows of every consumed partition, summed (``sse_replay_window_*``)."""

    def __init__(self, windows: Sequence[ReplayWindow]) -> None:
        self._windows = windows

    def __len__(self) -> int:
        return sum(len(window) for window in self._windows)

    @property
    def bytes(self) -> int:
        """Bytes of the frames kept, over all partitions."""
        return sum(window.bytes for window in self._windows)

    @property
    def max_bytes(self) -> int:
        """The bound on ``bytes``: each partition's, added up."""
        return sum(window.max_bytes for window in self._windows)

    @property
    def evicted(self) -> int:
        """Events evicted so far, over all partitions (for the stall log line)."""
        return sum(window.evicted for window in self._windows)


class PartitionGauges(Collector):
    """Per-partition gauges, read at scrape time: consuming, at the tail, the offset of
    the last message handled, the events and bytes kept for replay."""

    def __init__(self, partitions: LocalPartitions) -> None:
        self._partitions = partitions

    def collect(self) -> Iterable[Metric]:
        """One sample per consumed partition for each gauge."""
        label = ["partition"]
        consuming = GaugeMetricFamily(
            "sse_partition_consuming", "1 while the partition is consumed.", labels=label
        )
        caught_up = GaugeMetricFamily(
            "sse_partition_caught_up",
            "1 once the partition is read back to its tail (readiness waits for all).",
            labels=label,
        )
        offset = GaugeMetricFamily(
            "sse_partition_offset",
            "Stream queue offset of the partition's last message handled.",
            labels=label,
        )
        events = GaugeMetricFamily(
            "sse_partition_replay_window_events", "Events kept for replay.", labels=label
        )
        kept = GaugeMetricFamily(
            "sse_partition_replay_window_bytes", "Bytes of the frames kept.", labels=label
        )
        for partition in self._partitions:
            name = [str(partition.number)]
            consumer = partition.consumer
            consuming.add_metric(name, float(consumer.consuming))
            caught_up.add_metric(name, float(consumer.consuming and consumer.behind is None))
            if consumer.last_offset is not None:
                offset.add_metric(name, consumer.last_offset)
            events.add_metric(name, len(partition.window))
            kept.add_metric(name, partition.window.bytes)
        yield from (consuming, caught_up, offset, events, kept)
