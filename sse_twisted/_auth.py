"""Subscriber authentication against PostgreSQL, through a self-healing txpostgres pool.

The pool's connections are L{ReconnectingConnection}s (``_postgres.py``). txpostgres 1.7
needs two more workarounds here, each explained where it is made: the pool hands out dead
connections, and query cancellation cannot be used from a timeout.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead
from txpostgres.txpostgres import ConnectionPool
from zope.interface import implementer

from ._check_line import CheckLine
from ._config import Config
from ._postgres import (
    OUTAGES,
    ReconnectingConnection,
    connection_parameters,
    describe_postgres_error,
)
from .interfaces import BackendBusy, BackendUnavailable, IAuthenticator

__all__ = ["PostgresAuthenticator"]

_SUBSCRIBER_QUERY = "SELECT 1 FROM users WHERE uuid = %s AND sse_token = %s"
# A pair no subscriber has: the readiness probe runs the subscribe query, whatever it answers.
_PROBE_USERID = _PROBE_NONCE = "00000000-0000-0000-0000-000000000000"


class _LiveConnectionPool(ConnectionPool):
    """A txpostgres pool of reconnecting connections that queries only live ones, through
    a bounded L{CheckLine} instead of txpostgres's unbounded queue."""

    def __init__(
        self, reactor: Any, size: int, connect_timeout_seconds: float, max_waiting: int
    ) -> None:
        # Both set before ConnectionPool.__init__, which builds the connections, and imports the
        # global reactor when it has none.
        self.reactor = reactor
        self.connectionFactory = partial(
            ReconnectingConnection, connect_timeout_seconds=connect_timeout_seconds
        )
        super().__init__(None, min=size)
        # txpostgres's own set holds only the idle connections.
        self.all_connections: list[ReconnectingConnection] = list(self.connections)
        self.line: CheckLine[ReconnectingConnection] = CheckLine(max_waiting)
        self.queries_sent = 0
        self._dispatching = False

    @property
    def alive(self) -> bool:
        """True while at least one connection is alive."""
        return any(connection.alive for connection in self.all_connections)

    def run_query(
        self, query: str, parameters: tuple[Any, ...], first: bool = False
    ) -> Deferred[Any]:
        """Send ``query`` on an idle live connection, or once one is free.

        Fails at once with L{ConnectionDead} when no connection is alive, and with
        L{BackendBusy} when the line is full (``first`` jumps the line, see L{CheckLine}).
        Cancelling a query still waiting withdraws it; cancelling one sent only stops the
        wait, and its result is dropped.
        """
        if not self.alive:
            return fail(ConnectionDead())
        turn = self.line.wait(first)
        turn.addCallback(self._send, query, parameters)
        self._dispatch()
        return turn

    def _send(
        self, connection: ReconnectingConnection, query: str, parameters: tuple[Any, ...]
    ) -> Deferred[Any]:
        self.connections.remove(connection)
        self.queries_sent += 1
        sent: Deferred[Any] = connection.runQuery(query, parameters)
        sent.addBoth(self._returned, connection)
        # Waiting happens on a Deferred without canceller, which swallows the query's late
        # result: cancelling the query itself raises txpostgres's _CancelInProgress out of
        # Deferred.cancel() and blocks the reactor in libpq's PQcancel.
        answer: Deferred[Any] = Deferred()
        sent.chainDeferred(answer)
        return answer

    def _returned(self, result: object, connection: ReconnectingConnection) -> object:
        self.connections.add(connection)
        self._dispatch()
        return result

    def _dispatch(self) -> None:
        """Hand idle live connections to the waiting checks, oldest first."""
        if self._dispatching:
            return  # a query that failed at once re-enters from _returned: the loop goes on
        self._dispatching = True
        try:
            while self.line:
                # txpostgres takes any idle connection, but a dead one fails the query, and
                # one still connecting fails it too and makes the detector restart the connect.
                idle = next((each for each in self.connections if each.alive), None)
                if idle is None:
                    if not self.alive:
                        self.line.fail_all(ConnectionDead())
                    break
                self.line.hand_over(idle)
        finally:
            self._dispatching = False


@implementer(IAuthenticator)
class PostgresAuthenticator(Service):
    """Checks (userid, nonce) pairs against the ``users`` table over a reconnecting pool.

    Starting never fails: connections that cannot open keep retrying in the background, and
    meanwhile L{is_subscriber} fails at once with L{BackendUnavailable}.
    """

    log = Logger()

    def __init__(self, config: Config, reactor: IReactorTime) -> None:
        """Build the pool without connecting; ``reactor`` must also provide IReactorFDSet."""
        self._config = config
        self._reactor = reactor
        self._pool = _LiveConnectionPool(
            reactor,
            config.postgres_pool_size,
            config.postgres_timeout_seconds,
            config.max_pending_auth_checks,
        )
        self._connections = self._pool.all_connections

    @property
    def connected(self) -> bool:
        """True while at least one pool connection is alive."""
        return self._pool.alive

    @property
    def live_connections(self) -> int:
        """How many pool connections are alive."""
        return sum(connection.alive for connection in self._connections)

    @property
    def waiting(self) -> int:
        """How many subscriber checks wait for a free connection now."""
        return len(self._pool.line)

    @property
    def queries(self) -> int:
        """How many subscriber queries were sent to PostgreSQL since this was built."""
        return self._pool.queries_sent

    def startService(self) -> None:
        """Open every connection, retrying in the background the ones that fail."""
        super().startService()
        parameters = connection_parameters(self._config)
        for connection in self._connections:
            connection.open(**parameters)

    def stopService(self) -> Deferred[None]:
        """Close every connection and stop reconnecting."""
        super().stopService()
        for connection in self._connections:
            connection.shut_down()
        return succeed(None)

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        """Fire with whether the pair is in ``users``, or fail with L{BackendUnavailable}
        (L{BackendBusy} when ``max_pending_auth_checks`` checks wait already).

        The wait for a free connection and the query together last at most
        ``postgres_timeout_seconds``. Cancelling (or that timeout) withdraws a check still
        waiting; a query already sent finishes in the background and its result is dropped.
        """
        return self._ask(userid, nonce, first=False)

    def costs_no_query(self, userid: str, nonce: str) -> bool:
        """Never: every check is a query."""
        return False

    def probe(self) -> Deferred[bool]:
        """Run the subscribe query (for a pair no subscriber has) ahead of every waiting
        check: readiness asks whether PostgreSQL answers, not how long the line is."""
        return self._ask(_PROBE_USERID, _PROBE_NONCE, first=True)

    def _ask(self, userid: str, nonce: str, first: bool) -> Deferred[bool]:
        answer = self._pool.run_query(_SUBSCRIBER_QUERY, (userid, nonce), first)
        answer.addTimeout(self._config.postgres_timeout_seconds, self._reactor)
        return answer.addCallbacks(bool, self._unanswered, errbackArgs=(nonce,))

    def _unanswered(self, failure: Failure, nonce: str) -> bool | Failure:
        if failure.check(CancelledError, BackendBusy):
            # The caller gave up, or the line is full (the caller counts and logs that).
            return failure
        if failure.check(ValueError):
            # psycopg2 refuses text PostgreSQL cannot store (NUL, lone surrogates): no row
            # can match it.
            return False
        if failure.check(ConnectionDead):
            reason = "no live connection to PostgreSQL (reconnecting)"
        elif failure.check(DeferredTimeoutError):
            reason = f"no answer within {self._config.postgres_timeout_seconds} seconds"
        else:
            reason = describe_postgres_error(failure.value, hiding=(nonce,))
        if failure.check(*OUTAGES):
            self.log.warn(
                # Not the userid: it is the path segment as sent, unchecked, and a path with a
                # segment missing puts the token there.
                "cannot check a subscriber: {reason}",
                reason=reason,
            )
        elif failure.check(psycopg2.Error):
            self.log.error(
                "PostgreSQL rejects the subscriber query, check the users table: {reason}",
                reason=reason,
            )
        else:
            self.log.failure("cannot check a subscriber", failure)
        raise BackendUnavailable(reason)
