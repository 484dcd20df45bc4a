"""A service that listens on an endpoint while it runs, the base of both listeners."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure

__all__ = ["ListeningService"]


class ListeningService(Service):
    """Listens on ``endpoint`` with ``factory`` while running; ``listening`` fires with the
    port, or fails with why the listen failed.

    As C{StreamServerEndpointService} does, a stop before the listen has completed cancels
    it, and a port bound all the same is closed: none is left open behind a stopped service
    (and ``listening`` never fires).
    Subclasses act on the port in L{port_bound} and on a failure in L{listen_failed}.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._binding: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        """Start listening."""
        super().startService()
        self._binding = self._endpoint.listen(self._factory)
        self._binding.addCallbacks(self._bound, self._not_bound)

    def _bound(self, port: IListeningPort) -> None:
        self._binding = None
        if not self.running:
            # Stopped meanwhile, and the endpoint bound the port all the same.
            port.stopListening()
            return
        self._port = port
        self.port_bound(port)
        self.listening.callback(port)

    def _not_bound(self, reason: Failure) -> None:
        self._binding = None
        if reason.check(CancelledError) and not self.running:
            return  # stopped before the listen completed
        self.listen_failed(reason)
        self.listening.errback(reason)

    def port_bound(self, port: IListeningPort) -> None:
        """Called with the port once listening, before ``listening`` fires."""

    def listen_failed(self, reason: Failure) -> None:
        """Called when the listen fails, before ``listening`` fails with ``reason``."""

    def stopService(self) -> Deferred[None]:
        """Stop listening, or cancel a listen still in progress."""
        super().stopService()
        if self._binding is not None:
            self._binding.cancel()
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        return port.stopListening()  # type: ignore[return-value]
