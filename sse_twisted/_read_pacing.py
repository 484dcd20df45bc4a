"""Reading the broker in batches while messages trickle in (``SSE_INGEST_BATCH_MS``).

A consumer that reads each delivery as it arrives wakes the reactor for every few
messages, and a wake-up costs what several messages do. Paced, a connection that has read
everything its socket held stops reading until the next point of the tick grid, so what
arrives meanwhile is read in one wake-up, beside the stall tick; a message waits at most
the interval. A read that leaves bytes in the socket is never followed by a pause: pacing
never holds back a connection that is behind.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable
from typing import Any

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.protocols.policies import ProtocolWrapper

from ._ticks import delay_to_tick

__all__ = ["ReadPacer", "socket_backlog"]


def socket_backlog(transport: object) -> int:
    """Bytes waiting in the kernel to be read from ``transport``'s socket (C{FIONREAD}),
    under its TLS wrapping if it has one; 0 once the socket is closed (TLS hands over what
    it still holds while the connection is being lost)."""
    layer: Any = transport
    while isinstance(layer, ProtocolWrapper):
        layer = layer.transport
    try:
        count = fcntl.ioctl(layer.getHandle().fileno(), termios.FIONREAD, b"\0" * 4)
    except (AttributeError, OSError, ValueError):  # closed: fileno() -1, or no socket left
        return 0
    waiting: int = struct.unpack("i", count)[0]
    return waiting


class ReadPacer:
    """Pauses a transport's reads, after a read that emptied its socket, until the next
    multiple of ``interval_seconds``.

    ``backlog`` gives the bytes still waiting in the socket (L{socket_backlog}). Nothing is
    paced before L{arm}: the handshake, the declarations and the read-back are many small
    round trips, each of which a pause would hold up.
    """

    def __init__(
        self,
        reactor: Any,
        interval_seconds: float,
        backlog: Callable[[IPushProducer], int] = socket_backlog,
    ) -> None:
        self._reactor = reactor
        self._interval_seconds = interval_seconds
        self._backlog = backlog
        self._reads: IPushProducer | None = None
        self._resuming: DelayedCall | None = None
        self._armed = False

    def arm(self) -> None:
        """Start pacing: the consumer is live."""
        self._armed = True

    def attach(self, transport: ITransport) -> None:
        """Pace the reads of ``transport`` (the connection's, once it is made; under TLS a
        C{TLSMemoryBIOProtocol}, which provides what the TCP transport beneath provides and
        passes the calls on to it)."""
        self._reads = IPushProducer(transport, None)

    def received(self) -> None:
        """The protocol was just handed bytes read from the transport (TLS hands one read
        over in pieces: each calls this, the first decides)."""
        reads = self._reads
        if not self._armed or self._resuming is not None or reads is None:
            return
        if self._backlog(reads):
            return
        reads.pauseProducing()
        delay = delay_to_tick(self._reactor.seconds(), self._interval_seconds)
        self._resuming = self._reactor.callLater(delay, self._resume)

    def detach(self) -> None:
        """Stop pacing: the connection is lost."""
        self._reads = None
        if self._resuming is not None and self._resuming.active():
            self._resuming.cancel()
        self._resuming = None

    def _resume(self) -> None:
        self._resuming = None
        if self._reads is not None:
            self._reads.resumeProducing()
