"""Paced broker reads (SSE_INGEST_BATCH_MS) and the tick grid they share with the other
timers: on a Clock, the socket's backlog on a real socket pair. tests/test_consumer.py
consumes paced from a real broker, over AMQP and AMQPS."""

from __future__ import annotations

import socket
import time

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from sse_twisted._read_pacing import ReadPacer, socket_backlog
from sse_twisted._ticks import TICK_SECONDS, delay_to_tick, delay_to_tick_by


class _Socket:
    """Stands in for the kernel's count of bytes waiting in a connection's socket."""

    def __init__(self) -> None:
        self.waiting = 0

    def __call__(self, transport: object) -> int:
        return self.waiting


def paced(
    clock: Clock, interval: float = TICK_SECONDS
) -> tuple[ReadPacer, StringTransport, _Socket]:
    socket = _Socket()
    pacer = ReadPacer(clock, interval, socket)
    transport = StringTransport()
    pacer.attach(transport)
    pacer.arm()
    return pacer, transport, socket


def test_nothing_is_paced_before_the_consumer_is_live() -> None:
    clock = Clock()
    pacer = ReadPacer(clock, TICK_SECONDS, _Socket())
    transport = StringTransport()
    pacer.attach(transport)
    pacer.received()  # the handshake, the declarations, the read-back
    assert transport.producerState == "producing"
    assert clock.getDelayedCalls() == []
    pacer.arm()
    pacer.received()
    assert transport.producerState == "paused"


def test_a_read_that_empties_the_socket_pauses_reading_until_the_next_point_of_the_grid() -> None:
    clock = Clock()
    clock.advance(0.013)
    pacer, transport, _ = paced(clock)
    pacer.received()
    assert transport.producerState == "paused"
    clock.advance(0.05 - 0.013 - 0.001)
    assert transport.producerState == "paused"
    clock.advance(0.001)  # 0.05 s: where the stall tick falls too
    assert transport.producerState == "producing"


def test_a_read_that_leaves_bytes_in_the_socket_keeps_reading() -> None:
    clock = Clock()
    pacer, transport, socket = paced(clock)
    socket.waiting = 65536  # a connection that is behind
    pacer.received()
    assert transport.producerState == "producing"
    assert clock.getDelayedCalls() == []
    socket.waiting = 0  # caught up: the next read pauses
    pacer.received()
    assert transport.producerState == "paused"


def test_the_pieces_of_a_read_and_what_comes_while_paused_extend_no_pause() -> None:
    clock = Clock()
    pacer, transport, _ = paced(clock, interval=0.1)
    pacer.received()
    pacer.received()  # the next piece TLS decrypted from the same read
    clock.advance(0.06)
    pacer.received()
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0.04)  # still the first pause's point: 0.1 s
    assert transport.producerState == "producing"


def test_a_lost_connection_is_not_resumed_later_nor_paused_again() -> None:
    clock = Clock()
    pacer, transport, _ = paced(clock)
    pacer.received()
    pacer.detach()
    assert clock.getDelayedCalls() == []
    transport.resumeProducing()
    pacer.received()
    clock.advance(1)
    assert transport.producerState == "producing"


def test_the_socket_backlog_is_what_the_kernel_holds_unread_under_tls_too() -> None:
    here, there = socket.socketpair()
    with here, there:
        tcp = StringTransport()
        tcp.getHandle = lambda: here  # type: ignore[attr-defined]
        tls = TLSMemoryBIOFactory(
            CertificateOptions(), True, Factory.forProtocol(Protocol)
        ).buildProtocol(None)
        tls.makeConnection(tcp)
        assert socket_backlog(tls) == 0
        there.sendall(b"x" * 1000)
        deadline = time.monotonic() + 5
        while socket_backlog(tls) < 1000 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert socket_backlog(tls) == socket_backlog(tcp) == 1000
        here.recv(600)
        assert socket_backlog(tls) == 400
    assert socket_backlog(tls) == 0  # closed, as TLS hands over its last bytes
    del tcp.getHandle  # what Twisted's TCP transport does with a closed socket
    assert socket_backlog(tls) == 0


@pytest.mark.parametrize(
    ("now", "period", "expected"),
    [
        (0.0, 0.05, 0.05),
        (0.013, 0.05, 0.05),
        (0.05, 0.05, 0.1),  # on a point: the next one
        (3 * 0.05, 0.05, 0.2),  # 0.15000000000000002 is on the point 0.15
        (0.05 * 1_000_001 - 1e-12, 0.05, 50_000.1),  # a hair below a point, late in a run
        (1_780_000_000.0501, 0.05, 1_780_000_000.1),  # reactor time is epoch time
        (1_780_000_000.07, 0.05, 1_780_000_000.1),
        (0.07, 0.1, 0.1),
        (0.1, 0.025, 0.125),
    ],
)
def test_the_next_point_of_the_grid(now: float, period: float, expected: float) -> None:
    assert now + delay_to_tick(now, period) == pytest.approx(expected, abs=1e-6)


def test_timers_set_at_different_moments_for_one_point_are_due_together() -> None:
    # The stall tick (every 50 ms), a read paced every 25 ms and an ack due within 100 ms,
    # each set at its own moment: the reactor runs all three in the turn at 7.15 s.
    stall = 7.1234 + delay_to_tick(7.1234, 0.05)
    read = 7.13 + delay_to_tick(7.13, 0.025)
    ack = 7.06 + delay_to_tick_by(7.06, 0.1)
    assert stall == pytest.approx(7.15, abs=1e-9)
    assert read == pytest.approx(stall, abs=1e-9)
    assert ack == pytest.approx(stall, abs=1e-9)


def test_a_timer_within_a_deadline_fires_on_the_last_point_before_it() -> None:
    assert 0.0 + delay_to_tick_by(0.0, 0.1) == pytest.approx(0.1)
    assert 0.13 + delay_to_tick_by(0.13, 0.1) == pytest.approx(0.2)
    assert 0.2 + delay_to_tick_by(0.2, 0.1) == pytest.approx(0.3)


def test_under_tls_the_tcp_transport_beneath_is_paused() -> None:
    clock = Clock()
    tcp = StringTransport()
    wrapping = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol))
    tls = wrapping.buildProtocol(None)  # as wrapClientTLS builds it for the consumer
    tls.makeConnection(tcp)
    pacer = ReadPacer(clock, TICK_SECONDS, _Socket())
    pacer.attach(tls)
    pacer.arm()
    pacer.received()
    assert tcp.producerState == "paused"
    clock.advance(TICK_SECONDS)
    assert tcp.producerState == "producing"
