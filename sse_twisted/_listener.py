"""The public TLS listener, as a service that reports the address it bound."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["ListenerService"]


class ListenerService(Service):
    """Listen on ``endpoint`` while running; log the bound port (a readiness signal)."""

    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        """Start listening; a bind failure is logged and stops nothing else."""
        super().startService()
        binding = self._endpoint.listen(self._factory)
        binding.addCallback(self._bound)
        binding.addErrback(self._failed)

    def _bound(self, port: IListeningPort) -> None:
        self._port = port
        address = port.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        self.log.info("listening on {host}:{port}", host=address.host, port=address.port)
        self.listening.callback(port)

    def _failed(self, reason: Failure) -> None:
        self.log.failure("cannot listen", reason)
        self.listening.errback(reason)

    def stopService(self) -> Deferred[None]:
        """Stop accepting new connections."""
        super().stopService()
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        return port.stopListening()  # type: ignore[return-value]
