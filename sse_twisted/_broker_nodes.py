"""The RabbitMQ nodes the consumer may connect to, and an endpoint that goes round them.

A stream queue is replicated over the nodes of a cluster, and a consumer attached to any of
them reads the same offsets: when the node it is connected to is lost, it reconnects to
another and resumes where it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["BrokerNode", "BrokerNodesEndpoint", "NoBrokerNodeAnswered", "parse_broker_nodes"]


@dataclass(frozen=True)
class BrokerNode:
    """One RabbitMQ node: its host (the name TLS verifies) and AMQP port."""

    host: str
    port: int


def _port(text: str, item: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= 65535:
        raise ValueError(f"{item!r}: {text!r} is not a port number 1-65535")
    return int(text)


def parse_broker_nodes(text: str, default_port: int) -> tuple[BrokerNode, ...]:
    """The nodes of ``host``, ``host:port`` or ``[IPv6]:port`` items separated by commas;
    an item without a port gets ``default_port``. Raises ValueError naming a bad item."""
    nodes = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"{text!r} has an empty host")
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or not host or (rest and not rest.startswith(":")):
                raise ValueError(f"{item!r} is not [IPv6 address] or [IPv6 address]:port")
            port = _port(rest[1:], item) if rest else default_port
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            if not host:
                raise ValueError(f"{item!r} has no host")
            port = _port(port_text, item)
        else:
            # No colon, or a bare IPv6 address (several colons, no port).
            host, port = item, default_port
        nodes.append(BrokerNode(host, port))
    return tuple(nodes)


class NoBrokerNodeAnswered(Exception):
    """Every node was tried once and none could be connected to; says why for each."""


@implementer(IStreamClientEndpoint)
class BrokerNodesEndpoint:
    """Connect to the first of ``nodes`` that answers, going round them in turn.

    Each L{connect} starts from the node after the one last tried: after the one it
    connected to (which the next connect only follows once that connection is lost, or
    was refused at the AMQP handshake) or after the last one that failed. With a single
    node, a failure is passed on as it is; with several, once each has failed, as
    L{NoBrokerNodeAnswered}.

    @ivar address: ``scheme://host:port`` of the node connected to, or last tried.
    """

    def __init__(
        self,
        reactor: Any,
        nodes: tuple[BrokerNode, ...],
        tls: Callable[[str], IOpenSSLClientConnectionCreator] | None,
    ) -> None:
        if not nodes:
            raise ValueError("no RabbitMQ node to connect to")
        scheme = "amqp" if tls is None else "amqps"
        self._nodes: list[tuple[str, IStreamClientEndpoint]] = []
        for node in nodes:
            endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, node.host, node.port)
            if tls is not None:
                # Each node's certificate is checked against that node's own name.
                endpoint = wrapClientTLS(tls(node.host), endpoint)
            host = f"[{node.host}]" if ":" in node.host else node.host
            self._nodes.append((f"{scheme}://{host}:{node.port}", endpoint))
        self._next = 0
        self.address = self._nodes[0][0]

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        """Try each node once, from the one after the last tried, until one connects."""
        return _Round(self, factory).result

    def _try(self, index: int, factory: IProtocolFactory) -> Deferred[IProtocol]:
        address, endpoint = self._nodes[index % len(self._nodes)]
        self.address = address
        self._next = (index + 1) % len(self._nodes)
        return endpoint.connect(factory)

    def __repr__(self) -> str:
        return f"<RabbitMQ {', '.join(address for address, _ in self._nodes)}>"


class _Round:
    """One L{BrokerNodesEndpoint.connect}: each node at most once; cancellable throughout."""

    def __init__(self, endpoint: BrokerNodesEndpoint, factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._first = endpoint._next
        self._tried = 0
        self._failures: list[str] = []
        self._pending: Deferred[IProtocol] | None = None
        self._cancelled = False
        self.result: Deferred[IProtocol] = Deferred(self._cancel)
        self._try_next()

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        # The result fails with CancelledError; what the attempt does then is ignored.
        self._cancelled = True
        if self._pending is not None:
            self._pending.cancel()

    def _try_next(self) -> None:
        attempt = self._endpoint._try(self._first + self._tried, self._factory)
        self._tried += 1
        self._pending = attempt
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol: IProtocol) -> None:
        self._pending = None
        if not self._cancelled:
            self.result.callback(protocol)

    def _failed(self, reason: Failure) -> None:
        self._pending = None
        if self._cancelled:
            return
        count = len(self._endpoint._nodes)
        if count == 1 or reason.check(CancelledError):
            self.result.errback(reason)
            return
        self._failures.append(f"{self._endpoint.address}: {reason.getErrorMessage()}")
        if self._tried < count:
            self._try_next()
        else:
            self.result.errback(NoBrokerNodeAnswered("; ".join(self._failures)))
