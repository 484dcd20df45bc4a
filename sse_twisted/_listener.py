"""The public TLS listener: reports the address it bound and closes its connections on stop."""

from __future__ import annotations

import socket

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

__all__ = ["ListenerService"]


class _ConnectionTracker(WrappingFactory):
    """Keeps the open connections, and tells when the last one has closed."""

    noisy = False

    def __init__(self, factory: IProtocolFactory) -> None:
        super().__init__(factory)
        self._idle: list[Deferred[None]] = []

    def unregisterProtocol(self, protocol: ProtocolWrapper) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for idle in waiting:
                idle.callback(None)

    def when_idle(self) -> Deferred[None]:
        """Fires once no connection is open."""
        if not self.protocols:
            return succeed(None)
        idle: Deferred[None] = Deferred()
        self._idle.append(idle)
        return idle


class ListenerService(Service):
    """Listen on ``endpoint`` while running; log the bound port (a readiness signal)."""

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        clock: IReactorTime,
        unacknowledged_seconds: float = 0,
    ) -> None:
        self._endpoint = endpoint
        self._unacknowledged_seconds = unacknowledged_seconds
        self._connections = _ConnectionTracker(factory)
        self._clock = clock
        self._port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        """Start listening; a bind failure is logged and stops nothing else."""
        super().startService()
        binding = self._endpoint.listen(self._connections)
        binding.addCallback(self._bound)
        binding.addErrback(self._failed)

    def _bound(self, port: IListeningPort) -> None:
        self._port = port
        listening_socket = getattr(port, "socket", None)
        if self._unacknowledged_seconds and listening_socket is not None:
            # Accepted sockets inherit it: a client that vanished without a FIN (or stopped
            # reading) leaves heartbeats unacknowledged, and the kernel ends the connection
            # after this long instead of retransmitting for a quarter of an hour.
            listening_socket.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                int(self._unacknowledged_seconds * 1000),
            )
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

    def drain_connections(self) -> None:
        """Close each open connection once its responses in progress have ended (an HTTP/2
        one with GOAWAY); one whose protocol cannot be drained once its data is written."""
        for connection in list(self._connections.protocols):
            drain = getattr(connection.wrappedProtocol, "drain", None)
            if drain is None:
                connection.loseConnection()
            else:
                drain()

    async def close_connections(self, seconds: float) -> None:
        """Wait for the drained connections to close; abort those still open after
        ``seconds`` (clients that stopped reading)."""
        try:
            await self._connections.when_idle().addTimeout(seconds, self._clock)
        except DeferredTimeoutError:
            stuck = list(self._connections.protocols)
            self.log.warn("aborting {count} connections still open", count=len(stuck))
            for connection in stuck:
                connection.transport.abortConnection()
