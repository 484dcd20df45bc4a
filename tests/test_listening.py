"""Both listening services, stopped before their listen has completed, leave no port open."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from sse_twisted._listener import ListenerService
from sse_twisted._listening import ListeningService
from sse_twisted._metrics import MetricsListenerService


@implementer(IListeningPort)
class _Port:
    listening = True

    def startListening(self) -> None:
        """Already listening."""

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8001)


@implementer(IStreamServerEndpoint)
class _LaterEndpoint:
    """An endpoint whose listen completes when L{complete} is called (one that resolves a
    name first, say). Cancelling abandons the bind if ``abandons``; otherwise the bind was
    already done and the cancelled listen fires with its port."""

    def __init__(self, abandons: bool) -> None:
        self.ports: list[_Port] = []
        self._abandons = abandons
        self._pending: list[Deferred[IListeningPort]] = []

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        pending: Deferred[IListeningPort] = Deferred(self._cancelled)
        self._pending.append(pending)
        return pending

    def _cancelled(self, pending: Deferred[IListeningPort]) -> None:
        self._pending.remove(pending)
        if not self._abandons:
            pending.callback(self._bind())

    def _bind(self) -> _Port:
        port = _Port()
        self.ports.append(port)
        return port

    def complete(self) -> None:
        pending, self._pending = self._pending, []
        for each in pending:
            each.callback(self._bind())


def _public(endpoint: IStreamServerEndpoint) -> ListeningService:
    return ListenerService(endpoint, Factory.forProtocol(Protocol), Clock())


def _metrics(endpoint: IStreamServerEndpoint) -> ListeningService:
    return MetricsListenerService(endpoint, Site(Resource()))


_SERVICES = pytest.mark.parametrize("make", [_public, _metrics], ids=["public", "metrics"])


@_SERVICES
@pytest.mark.parametrize("abandons", [True, False], ids=["abandoned", "bound-anyway"])
def test_a_service_stopped_before_its_listen_completed_leaves_no_port_open(
    make: Callable[[IStreamServerEndpoint], ListeningService], abandons: bool
) -> None:
    endpoint = _LaterEndpoint(abandons)
    service = make(endpoint)
    service.startService()
    stopped = service.stopService()
    endpoint.complete()
    assert stopped.called
    assert [port for port in endpoint.ports if port.listening] == []
    assert not service.listening.called


@_SERVICES
def test_a_service_whose_listen_completes_later_listens_then_stops(
    make: Callable[[IStreamServerEndpoint], ListeningService],
) -> None:
    endpoint = _LaterEndpoint(abandons=True)
    service = make(endpoint)
    service.startService()
    endpoint.complete()
    [port] = endpoint.ports
    assert service.listening.called and port.listening
    service.stopService()
    assert not port.listening
