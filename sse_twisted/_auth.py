"""Subscriber authentication against PostgreSQL, through a self-healing txpostgres pool.

txpostgres 1.7 needs workarounds, each explained where it is made: reconnection is opt-in
per connection and does not cover the first connect, an idle connection's death escapes
from ``doRead`` as an "Unhandled Error" traceback, the pool hands out dead connections, and
query cancellation cannot be used from a timeout.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import psycopg2
from twisted.application.service import Service
from twisted.internet.base import DelayedCall
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector, defaultDeathChecker
from txpostgres.retrying import simpleBackoffIterator
from txpostgres.txpostgres import Connection, ConnectionPool
from zope.interface import implementer

from ._check_line import CheckLine
from ._config import Config
from ._tls import POSTGRES_CA_FILE
from .interfaces import BackendBusy, BackendUnavailable, IAuthenticator

__all__ = ["PostgresAuthenticator"]

_SUBSCRIBER_QUERY = "SELECT 1 FROM users WHERE uuid = %s AND sse_token = %s"
# The pairs come as two arrays, zipped by unnest: one statement for any number of pairs.
_GRANTED_QUERY = (
    "SELECT uuid, sse_token FROM users WHERE (uuid, sse_token) IN "
    "(SELECT * FROM unnest(%s::varchar[], %s::varchar[]))"
)
# A pair no subscriber has: the readiness probe runs the subscribe query, whatever it answers.
_PROBE_USERID = _PROBE_NONCE = "00000000-0000-0000-0000-000000000000"
_VERIFYING_SSLMODES = ("verify-ca", "verify-full")
_MASK = "****"

# "PostgreSQL cannot answer now", as opposed to a broken schema or a bug.
_OUTAGES = (
    ConnectionDead,
    ConnectionClosed,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    DeferredTimeoutError,
)


def _reconnect_delays() -> Iterator[float]:
    """Seconds before each reconnection attempt: none, then about 1 s doubling up to 10 s."""
    return simpleBackoffIterator(initialDelay=0.5, maxDelay=10.0, factor=2.0, maxRetries=0)


def _describe(error: object) -> str:
    """The error on one line, and of a server error only the primary message.

    The rest of psycopg2's text for a server error quotes the query with its parameters.
    A failed connect keeps every line: libpq writes one per address it tried.
    """
    if isinstance(error, psycopg2.Error) and error.diag.message_primary:
        return str(error.diag.message_primary)
    return " ".join(str(error).split()) or type(error).__name__


def _connection_parameters(config: Config) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "host": config.postgres_host,
        "port": config.postgres_port,
        "user": config.postgres_username,
        "password": config.postgres_password,
        "dbname": config.postgres_db_name,
        "sslmode": config.postgres_sslmode,
        "connect_timeout": math.ceil(config.postgres_timeout_seconds),
        # A server that vanishes without closing the socket is noticed by TCP keepalives
        # (otherwise only by a failing query), and a query stuck behind a lock gives its
        # connection back once the caller has stopped waiting.
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "options": f"-c statement_timeout={math.ceil(config.postgres_timeout_seconds * 1000)}",
    }
    if config.postgres_sslmode in _VERIFYING_SSLMODES:
        parameters["sslrootcert"] = str(config.certs_dir / POSTGRES_CA_FILE)
    return parameters


class _ReconnectingConnection(Connection):
    """A txpostgres connection that reopens itself, with backoff, whenever it is lost."""

    log = Logger()

    def __init__(self, reactor: Any, cooperator: Any, connect_timeout_seconds: float) -> None:
        # txpostgres reconnects only connections given a detector; ConnectionPool gives none.
        detector = DeadConnectionDetector(
            deathChecker=self._is_dead, reconnectionIterator=_reconnect_delays, reactor=reactor
        )
        super().__init__(reactor, cooperator, detector=detector)
        self._connect_timeout_seconds = connect_timeout_seconds
        self._open = False
        self._shut_down = False

    @property
    def alive(self) -> bool:
        """Whether queries can be sent: connected and not known to be dead."""
        return self._open and not self.detector.connectionIsDead

    def _is_dead(self, failure: Failure) -> bool:
        # A closed socket counts too (our connect timeout, a hang-up), unless we closed it.
        return not self._shut_down and bool(
            defaultDeathChecker(failure) or failure.check(ConnectionClosed)
        )

    def open(self, **parameters: Any) -> Deferred[None]:
        """Connect now and keep retrying in the background until it works.

        The result fires once the first attempt is over, whatever its outcome: L{alive} then
        tells whether it worked. A connection made by a later retry (after a failed first
        attempt or a lost connection) is announced to the detector's recovery handlers; one
        made by the first attempt is not.
        """
        # The detector only reconnects what was connected once: hand it a failed first try.
        attempt = self.connect(**parameters)
        attempt.addErrback(self.detector.checkForDeadConnection)
        attempt.addErrback(lambda _: None)  # logged by _connect_finished
        return attempt.addCallback(lambda _: None)

    def shut_down(self) -> None:
        """Close for good: no reconnection after this."""
        self._shut_down = True
        self._open = False
        if self.pollable() is not None:
            self.close()

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """Open the connection; give up when the server has not answered in time."""
        if self._shut_down:
            # The detector's retry loop cannot be cancelled, and logs an error when it fails
            # or runs out: a pretend success is the quiet way to end it.
            return succeed(None)
        self._open = False
        attempt: Deferred[Any] = super().connect(*args, **kwargs)
        # libpq ignores connect_timeout for non-blocking connects; closing the socket ends the
        # attempt with ConnectionDone.
        give_up = self.reactor.callLater(self._connect_timeout_seconds, self.close)
        return attempt.addBoth(self._connect_finished, give_up, kwargs)

    def _connect_finished(
        self, result: object, give_up: DelayedCall, parameters: dict[str, Any]
    ) -> object:
        timed_out = not give_up.active()
        if not timed_out:
            give_up.cancel()
        where = {key: parameters[key] for key in ("host", "port", "dbname")}
        if not isinstance(result, Failure):
            self._open = True
            self.log.info("connected to PostgreSQL {host}:{port}/{dbname}", **where)
        elif not self._shut_down:
            reason = _describe(result.value)
            if timed_out:
                reason = f"no answer within {self._connect_timeout_seconds} seconds"
            self.log.warn(
                "cannot connect to PostgreSQL {host}:{port}/{dbname}: {reason}",
                reason=reason,
                **where,
            )
        return result

    def doRead(self) -> BaseException | None:
        """Read from the socket; a lost connection is returned for the reactor to close."""
        # txpostgres lets poll()'s error escape when an idle connection dies (the server
        # restarts, say) and the reactor logs it as "Unhandled Error". Returned instead, it
        # makes the reactor call connectionLost quietly, which starts the reconnection.
        try:
            super().doRead()
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as error:
            self.log.warn("lost connection to PostgreSQL: {reason}", reason=_describe(error))
            return error
        return None


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
            _ReconnectingConnection, connect_timeout_seconds=connect_timeout_seconds
        )
        super().__init__(None, min=size)
        # txpostgres's own set holds only the idle connections.
        self.all_connections: list[_ReconnectingConnection] = list(self.connections)
        self.line: CheckLine[_ReconnectingConnection] = CheckLine(max_waiting)
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
        self, connection: _ReconnectingConnection, query: str, parameters: tuple[Any, ...]
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

    def _returned(self, result: object, connection: _ReconnectingConnection) -> object:
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
        parameters = _connection_parameters(self._config)
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
            reason = _describe(failure.value)
            if nonce:
                # A server message can quote a parameter, in a type error say.
                reason = reason.replace(nonce, _MASK)
        if failure.check(*_OUTAGES):
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

    def granted(self, pairs: Sequence[tuple[str, str]]) -> Deferred[set[tuple[str, str]]]:
        """Fire with those of the (userid, nonce) ``pairs`` that are in ``users``, asked in
        one query; fail with L{BackendUnavailable} when PostgreSQL cannot answer."""
        # Through the same bounded line as subscriber checks (it waits its turn like one).
        answer = self._pool.run_query(
            _GRANTED_QUERY, ([userid for userid, _ in pairs], [nonce for _, nonce in pairs])
        )
        answer.addTimeout(self._config.postgres_timeout_seconds, self._reactor)
        return answer.addCallbacks(
            lambda rows: {(userid, nonce) for userid, nonce in rows},
            self._granted_unanswered,
            errbackArgs=(pairs,),
        )

    def _granted_unanswered(self, failure: Failure, pairs: Sequence[tuple[str, str]]) -> Failure:
        if failure.check(ConnectionDead):
            reason = "no live connection to PostgreSQL (reconnecting)"
        elif failure.check(DeferredTimeoutError):
            reason = f"no answer within {self._config.postgres_timeout_seconds} seconds"
        elif failure.check(psycopg2.Error, *_OUTAGES):
            # A server message can quote a parameter.
            reason = _describe(failure.value)
            for _, nonce in pairs:
                if nonce:
                    reason = reason.replace(nonce, _MASK)
        else:
            return failure
        raise BackendUnavailable(reason)
