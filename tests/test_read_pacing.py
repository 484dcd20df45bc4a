"""Paced broker reads (SSE_INGEST_BATCH_MS) and the tick grid they share with the other
timers: in memory, on a Clock. tests/test_consumer.py consumes paced from a real broker."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from sse_twisted._read_pacing import BACKLOG_BYTES, ReadPacer
from sse_twisted._socket_reads import socket_reads
from sse_twisted._ticks import TICK_SECONDS, delay_to_tick, delay_to_tick_by


def paced(clock: Clock, interval: float = TICK_SECONDS) -> tuple[ReadPacer, StringTransport]:
    pacer = ReadPacer(clock, interval)
    transport = StringTransport()
    pacer.attach(transport)
    return pacer, transport


def test_a_small_read_pauses_reading_until_the_next_point_of_the_grid() -> None:
    clock = Clock()
    clock.advance(0.013)
    pacer, transport = paced(clock)
    pacer.received(300)
    assert transport.producerState == "producing"  # the read is judged once its turn is over
    clock.advance(0)
    assert transport.producerState == "paused"
    clock.advance(0.05 - 0.013 - 0.001)
    assert transport.producerState == "paused"
    clock.advance(0.001)  # 0.05 s: where the stall tick falls too
    assert transport.producerState == "producing"


def test_a_read_of_a_backlog_keeps_reading() -> None:
    clock = Clock()
    pacer, transport = paced(clock)
    pacer.received(BACKLOG_BYTES)
    clock.advance(0)
    assert transport.producerState == "producing"
    pacer.received(BACKLOG_BYTES - 1)  # the backlog is read: the next small read pauses
    clock.advance(0)
    assert transport.producerState == "paused"


def test_a_read_handed_over_in_pieces_is_judged_whole() -> None:
    clock = Clock()
    pacer, transport = paced(clock)
    for _ in range(4):  # how TLS hands one socket read of 64 KiB to the protocol
        pacer.received(BACKLOG_BYTES // 2)
    clock.advance(0)
    assert transport.producerState == "producing"


def test_reads_while_paused_extend_no_pause() -> None:
    clock = Clock()
    pacer, transport = paced(clock, interval=0.1)
    pacer.received(10)
    clock.advance(0)
    clock.advance(0.06)
    pacer.received(10)  # what TLS had decrypted already comes after the pause
    clock.advance(0)
    assert transport.producerState == "paused"
    clock.advance(0.04)  # still the first pause's point: 0.1 s
    assert transport.producerState == "producing"


def test_a_lost_connection_is_neither_paused_nor_resumed_later() -> None:
    clock = Clock()
    pacer, transport = paced(clock)
    pacer.received(10)
    clock.advance(0)
    pacer.detach()
    assert clock.getDelayedCalls() == []
    pacer.received(10)
    clock.advance(1)
    assert transport.producerState == "paused"  # as left: the transport is gone


def test_a_read_just_before_its_connection_is_lost_schedules_nothing() -> None:
    clock = Clock()
    pacer, _ = paced(clock)
    pacer.received(10)
    pacer.detach()
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("now", "period", "expected"),
    [
        (0.0, 0.05, 0.05),
        (0.013, 0.05, 0.05),
        (0.05, 0.05, 0.1),  # on a point: the next one
        (3 * 0.05, 0.05, 0.2),  # 0.15000000000000002 is on the point 0.15
        (0.05 * 1_000_001 - 1e-12, 0.05, 50_000.1),  # a hair below a point, late in a run
        (0.07, 0.1, 0.1),
        (0.1, 0.025, 0.125),
    ],
)
def test_the_next_point_of_the_grid(now: float, period: float, expected: float) -> None:
    assert now + delay_to_tick(now, period) == pytest.approx(expected, abs=1e-9)


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


def test_under_tls_wrapping_the_socket_reads_are_the_transport_beneath() -> None:
    tcp = StringTransport()
    wrapping = TLSMemoryBIOFactory(CertificateOptions(), True, Factory.forProtocol(Protocol))
    tls = wrapping.buildProtocol(None)
    tls.makeConnection(tcp)
    assert socket_reads(tls) is tcp
    assert socket_reads(tcp) is tcp
    assert socket_reads(None) is None
