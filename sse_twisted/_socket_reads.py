"""What pauses a connection's reads from its socket, TLS wrapping or not."""

from __future__ import annotations

from twisted.internet.interfaces import IPushProducer, ITransport
from twisted.protocols.policies import ProtocolWrapper

__all__ = ["socket_reads"]


def socket_reads(transport: ITransport | None) -> IPushProducer | None:
    """The producer whose C{pauseProducing} stops reading ``transport``'s socket: the
    transport itself, or, under a protocol that wraps it (C{TLSMemoryBIOProtocol}, as
    C{wrapClientTLS} and C{TLSMemoryBIOFactory} build, which passes the calls on without
    declaring C{IPushProducer}), the transport beneath. None when there is none.
    """
    while isinstance(transport, ProtocolWrapper):
        transport = transport.transport
    return IPushProducer(transport, None)
