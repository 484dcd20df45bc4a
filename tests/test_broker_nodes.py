"""The RabbitMQ node list: parsing, and the endpoint going round the nodes over real TCP."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from zope.interface.verify import verifyObject

from sse_twisted._broker_nodes import (
    BrokerNode,
    BrokerNodesEndpoint,
    NoBrokerNodeAnswered,
    parse_broker_nodes,
)
from tests.waiting import bounded

TIMEOUT = 10.0


def test_a_single_host_gets_the_default_port() -> None:
    assert parse_broker_nodes("rabbitmq", 5671) == (BrokerNode("rabbitmq", 5671),)


def test_a_list_mixes_hosts_with_and_without_ports_and_ipv6_literals() -> None:
    nodes = parse_broker_nodes("a, b:5673,[::1]:5674,[fe80::1],::1", 5672)
    assert nodes == (
        BrokerNode("a", 5672),
        BrokerNode("b", 5673),
        BrokerNode("::1", 5674),
        BrokerNode("fe80::1", 5672),
        BrokerNode("::1", 5672),
    )


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("a,,b", "empty host"),
        ("a:x", "'x' is not a port number"),
        ("a:0", "'0' is not a port number"),
        (":5672", "has no host"),
        ("[::1", "is not [IPv6 address]"),
        ("[::1]5672", "is not [IPv6 address]"),
    ],
)
def test_a_malformed_node_list_is_refused_naming_the_bad_item(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint.replace("[", r"\[")):
        parse_broker_nodes(text, 5672)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        self.factory.accepted.append(self)  # type: ignore[attr-defined]


@asynccontextmanager
async def listening() -> AsyncIterator[tuple[int, list[Protocol]]]:
    """A TCP listener on 127.0.0.1: its port, and the connections it accepted."""
    factory = Factory.forProtocol(_Accepted)
    factory.accepted = []  # type: ignore[attr-defined]
    port: IListeningPort = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        factory
    )
    try:
        yield port.getHost().port, factory.accepted  # type: ignore[attr-defined]
    finally:
        await port.stopListening()


def endpoint(*ports: int) -> BrokerNodesEndpoint:
    nodes = tuple(BrokerNode("127.0.0.1", port) for port in ports)
    return BrokerNodesEndpoint(reactor, nodes, None)


async def connect(nodes: BrokerNodesEndpoint) -> Protocol:
    protocol: Protocol = await bounded(nodes.connect(Factory.forProtocol(Protocol)), TIMEOUT)
    return protocol


def test_the_endpoint_provides_the_client_endpoint_interface() -> None:
    assert verifyObject(IStreamClientEndpoint, endpoint(5672))


@pytest_twisted.ensureDeferred
async def test_a_node_that_refuses_is_skipped_for_the_next_one() -> None:
    down = closed_port()
    async with listening() as (up, accepted):
        nodes = endpoint(down, up)
        protocol = await connect(nodes)
        assert nodes.address == f"amqp://127.0.0.1:{up}"
        protocol.transport.loseConnection()
    assert len(accepted) == 1


async def three_connects(nodes: BrokerNodesEndpoint) -> list[str]:
    """The node each of three connects reached, each connection lost before the next."""
    addresses = []
    for _ in range(3):
        protocol = await connect(nodes)
        addresses.append(nodes.address)
        protocol.transport.loseConnection()
    return addresses


@pytest_twisted.ensureDeferred
async def test_each_connect_starts_from_the_node_after_the_last_one_connected() -> None:
    # The next connect only follows a lost connection (or a refused handshake): move on.
    async with listening() as (first, at_first), listening() as (second, at_second):
        addresses = await three_connects(endpoint(first, second))
    assert addresses == [
        f"amqp://127.0.0.1:{first}",
        f"amqp://127.0.0.1:{second}",
        f"amqp://127.0.0.1:{first}",
    ]
    assert (len(at_first), len(at_second)) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_a_node_down_is_passed_over_in_each_round() -> None:
    down = closed_port()
    async with listening() as (second, at_second), listening() as (third, at_third):
        addresses = await three_connects(endpoint(down, second, third))
    # The first down, the second; after the second, the third; after it, round again.
    assert addresses == [
        f"amqp://127.0.0.1:{second}",
        f"amqp://127.0.0.1:{third}",
        f"amqp://127.0.0.1:{second}",
    ]
    assert (len(at_second), len(at_third)) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_when_every_node_refuses_the_failure_names_each_node_and_its_reason() -> None:
    ports = closed_port(), closed_port(), closed_port()
    with pytest.raises(NoBrokerNodeAnswered) as failure:
        await connect(endpoint(*ports))
    parts = str(failure.value).split("; ")
    assert [part.split(": ")[0] for part in parts] == [f"amqp://127.0.0.1:{p}" for p in ports]
    assert all("refused" in part for part in parts)


@pytest_twisted.ensureDeferred
async def test_a_single_node_fails_exactly_as_a_plain_endpoint_does() -> None:
    port = closed_port()
    nodes = endpoint(port)
    with pytest.raises(ConnectionRefusedError):
        await connect(nodes)
    assert nodes.address == f"amqp://127.0.0.1:{port}"


@pytest_twisted.ensureDeferred
async def test_cancelling_a_connect_stops_trying_further_nodes() -> None:
    # 192.0.2.1 (TEST-NET-1) never answers: the attempt is pending when cancelled.
    async with listening() as (up, accepted):
        nodes = BrokerNodesEndpoint(
            reactor, (BrokerNode("192.0.2.1", 5672), BrokerNode("127.0.0.1", up)), None
        )
        attempt = nodes.connect(Factory.forProtocol(Protocol))
        attempt.cancel()
        with pytest.raises(CancelledError):
            await attempt
        # Long enough for a connection to the second node to have been accepted.
        settle: Deferred[None] = Deferred()
        reactor.callLater(0.3, settle.callback, None)
        await settle
    assert accepted == []
    assert nodes.address == "amqp://192.0.2.1:5672"


def test_with_tls_each_node_is_verified_against_its_own_name() -> None:
    asked: list[str] = []

    def tls_for(host: str) -> object:
        asked.append(host)
        return optionsForClientTLS(host)

    nodes = BrokerNodesEndpoint(
        reactor,
        parse_broker_nodes("rabbit-a,rabbit-b:5673,[::1]", 5671),
        tls_for,  # type: ignore[arg-type]
    )
    assert asked == ["rabbit-a", "rabbit-b", "::1"]
    assert repr(nodes) == (
        "<RabbitMQ amqps://rabbit-a:5671, amqps://rabbit-b:5673, amqps://[::1]:5671>"
    )
