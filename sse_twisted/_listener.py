"""The public TLS listener: reports the address it bound and closes its connections on stop.

It binds its own port, or serves on a listening socket systemd passes (socket activation):
that socket outlives every server process, so a connection that arrives while one process
has stopped accepting and the next has not started waits in its queue instead of being
refused.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ._config import Config, ConfigError
from ._listening import ListeningService

__all__ = ["FIRST_REQUEST_SECONDS", "ListenerService", "tls_endpoint"]


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    """TLS over the connections of another server endpoint (what C{listenSSL} does for a
    port it binds)."""

    def __init__(self, wrapped: IStreamServerEndpoint, tls: IOpenSSLServerConnectionCreator):
        self._wrapped = wrapped
        self._tls = tls

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._wrapped.listen(TLSMemoryBIOFactory(self._tls, False, factory))


def _systemd_socket(reactor: Any) -> AdoptedStreamServerEndpoint:
    """The first socket systemd passed (LISTEN_FDS), whatever its address family.

    Raises L{ConfigError} when there is none, or when it is not a listening TCP socket.
    """
    # Twisted reads (and removes) LISTEN_FDS/LISTEN_PID when twisted.internet.endpoints is
    # imported: its own parser is the one place that still knows the descriptors. It also
    # ignores them without LISTEN_FDNAMES, which systemd always sets (since v227) and
    # systemd-socket-activate only with --fdname.
    try:
        inherited = serverFromString(reactor, "systemd:domain=INET:index=0")
    except IndexError:
        raise ConfigError(
            "SSE_LISTEN_SOCKET=systemd, but no socket was passed to this process "
            "(LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES): start it through its socket unit, "
            "or use SSE_LISTEN_SOCKET=bind"
        ) from None
    assert isinstance(inherited, AdoptedStreamServerEndpoint)
    # ListenStream=8001 gives an IPv6 socket that also takes IPv4; 0.0.0.0:8001 an IPv4 one.
    probe = socket.socket(fileno=inherited.fileno)
    try:
        family, kind = probe.family, probe.type
        accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        probe.detach()
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        raise ConfigError(
            "SSE_LISTEN_SOCKET=systemd: the socket passed is not a TCP socket "
            "(use ListenStream= with a port in the socket unit)"
        )
    if not accepting:
        raise ConfigError("SSE_LISTEN_SOCKET=systemd: the socket passed is not listening")
    return AdoptedStreamServerEndpoint(reactor, inherited.fileno, family)


def tls_endpoint(
    reactor: Any, config: Config, tls: IOpenSSLServerConnectionCreator
) -> IStreamServerEndpoint:
    """Where browsers connect: the TLS port bound here, or the socket systemd passed.

    Raises L{ConfigError} for C{SSE_LISTEN_SOCKET=systemd} without a usable socket.
    """
    if config.listen_socket == "systemd":
        return _TLSServerEndpoint(_systemd_socket(reactor), tls)
    return SSL4ServerEndpoint(
        reactor,
        config.port,
        tls,
        backlog=config.listen_backlog,
        interface=config.listen_address,
    )


# A client that connected just before a drain sends its request within a few round trips.
FIRST_REQUEST_SECONDS = 1.0


class _TrackedConnection(ProtocolWrapper):
    """A connection that knows whether its client has sent a request yet, and can be
    drained: closed once the responses in progress have ended."""

    spoke = False
    drain_after_request = False

    def dataReceived(self, data: bytes) -> None:
        self.spoke = True
        super().dataReceived(data)
        if self.drain_after_request:
            self.drain_after_request = False
            self.drain()

    def drain(self) -> None:
        """Close once the responses in progress have ended (an HTTP/2 connection with
        GOAWAY); a protocol that cannot be drained once its data is written."""
        drain = getattr(self.wrappedProtocol, "drain", None)
        if drain is None:
            self.loseConnection()
        else:
            drain()


class _ConnectionTracker(WrappingFactory):
    """Keeps the open connections, and tells when the last one has closed."""

    noisy = False
    protocol = _TrackedConnection

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


class ListenerService(ListeningService):
    """Listen on ``endpoint`` while running; log the bound port (a readiness signal)."""

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        clock: IReactorTime,
        unacknowledged_seconds: float = 0,
    ) -> None:
        self._connections = _ConnectionTracker(factory)
        super().__init__(endpoint, self._connections)
        self._unacknowledged_seconds = unacknowledged_seconds
        self._clock = clock

    def port_bound(self, port: IListeningPort) -> None:
        """Set the accepted sockets' TCP_USER_TIMEOUT, and log the port."""
        listening_socket = getattr(port, "socket", None)
        if self._unacknowledged_seconds and listening_socket is not None:
            # Accepted sockets inherit it: a client that vanished without a FIN (or stopped
            # reading) leaves heartbeats unacknowledged, and the kernel ends the connection
            # after this long instead of retransmitting for a quarter of an hour. On a socket
            # systemd passed, this sets it on the shared socket, for every process after us.
            listening_socket.setsockopt(
                socket.IPPROTO_TCP,
                socket.TCP_USER_TIMEOUT,
                int(self._unacknowledged_seconds * 1000),
            )
        address = port.getHost()
        assert isinstance(address, IPv4Address | IPv6Address)
        self.log.info("listening on {host}:{port}", host=address.host, port=address.port)

    def listen_failed(self, reason: Failure) -> None:
        """Log it: a bind failure stops nothing else."""
        self.log.failure("cannot listen", reason)

    def _close_if_silent(self, connection: _TrackedConnection) -> None:
        if connection in self._connections.protocols and not connection.spoke:
            connection.loseConnection()

    def drain_connections(self) -> None:
        """Close each open connection once its responses in progress have ended.

        A connection whose client has not spoken yet may have been accepted in the last
        moments before the listener stopped: it is drained once its first request is read
        and answered (cut now, the client would see a reset where a restart promises none).
        One still silent after L{FIRST_REQUEST_SECONDS} is idle (a browser's spare
        connection) and is closed then."""
        for connection in list(self._connections.protocols):
            if connection.spoke:
                connection.drain()
            else:
                connection.drain_after_request = True
                self._clock.callLater(FIRST_REQUEST_SECONDS, self._close_if_silent, connection)

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
