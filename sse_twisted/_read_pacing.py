"""Reading the broker in batches while messages trickle in (``SSE_INGEST_BATCH_MS``).

A consumer that reads each delivery as it arrives wakes the reactor for every few
messages, and a wake-up costs what several messages do. Paced, a connection that has just
read a little stops reading until the next point of the tick grid, so what arrives
meanwhile is read in one wake-up, beside the stall tick; a message waits at most the
interval. A read of a backlog (at least L{BACKLOG_BYTES}) is never followed by a pause:
pacing never holds back a connection that is behind.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IPushProducer, ITransport

from ._socket_reads import socket_reads
from ._ticks import delay_to_tick

__all__ = ["BACKLOG_BYTES", "ReadPacer"]

BACKLOG_BYTES = 32 * 1024
"""A read at least this large (half of what Twisted reads at once) may have left more in
the socket: reading goes on."""


class ReadPacer:
    """Pauses a transport's reads after each small read until the next multiple of
    ``interval_seconds``.

    A read is judged whole once the reactor turn that delivered it is over, since TLS
    hands one socket read to the protocol in several pieces.
    """

    def __init__(self, reactor: Any, interval_seconds: float) -> None:
        self._reactor = reactor
        self._interval_seconds = interval_seconds
        self._transport: IPushProducer | None = None
        self._bytes_read = 0
        self._judging: DelayedCall | None = None
        self._resuming: DelayedCall | None = None

    def attach(self, transport: ITransport) -> None:
        """Pace the reads of ``transport`` (the connection's, once it is made)."""
        self._transport = socket_reads(transport)

    def received(self, size: int) -> None:
        """Count ``size`` bytes just handed to the protocol."""
        self._bytes_read += size
        if self._judging is None and self._transport is not None:
            self._judging = self._reactor.callLater(0, self._judge_read)

    def detach(self) -> None:
        """Stop pacing: the connection is lost."""
        self._transport = None
        for call in (self._judging, self._resuming):
            if call is not None and call.active():
                call.cancel()
        self._judging = self._resuming = None

    def _judge_read(self) -> None:
        self._judging = None
        small = self._bytes_read < BACKLOG_BYTES
        self._bytes_read = 0
        if small and self._resuming is None and self._transport is not None:
            self._transport.pauseProducing()
            delay = delay_to_tick(self._reactor.seconds(), self._interval_seconds)
            self._resuming = self._reactor.callLater(delay, self._resume)

    def _resume(self) -> None:
        self._resuming = None
        if self._transport is not None:
            self._transport.resumeProducing()
