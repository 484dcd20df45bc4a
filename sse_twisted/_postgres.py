"""The PostgreSQL connection both the authenticator's pool and the revocation listener use:
connection parameters from the config, a txpostgres connection that reconnects itself, and
how an error is classified and shown.

txpostgres 1.7 needs workarounds, each explained where it is made: reconnection is opt-in
per connection and does not cover the first connect, and an idle connection's death escapes
from ``doRead`` as an "Unhandled Error" traceback.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg2
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.error import ConnectionClosed
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector, defaultDeathChecker
from txpostgres.retrying import simpleBackoffIterator
from txpostgres.txpostgres import Connection

from ._config import Config
from ._tls import POSTGRES_CA_FILE

__all__ = [
    "OUTAGES",
    "ReconnectingConnection",
    "connection_parameters",
    "describe_postgres_error",
]

_VERIFYING_SSLMODES = ("verify-ca", "verify-full")
_MASK = "****"

# "PostgreSQL cannot answer now", as opposed to a broken schema or a bug.
OUTAGES = (
    ConnectionDead,
    ConnectionClosed,
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    DeferredTimeoutError,
)


def _reconnect_delays() -> Iterator[float]:
    """Seconds before each reconnection attempt: none, then about 1 s doubling up to 10 s."""
    return simpleBackoffIterator(initialDelay=0.5, maxDelay=10.0, factor=2.0, maxRetries=0)


def describe_postgres_error(error: object, hiding: Iterable[str] = ()) -> str:
    """The error on one line, and of a server error only the primary message, with each
    (non-empty) string of ``hiding`` masked.

    The rest of psycopg2's text for a server error quotes the query with its parameters,
    and even the primary message can quote one (in a type error, say): pass the secrets
    among them as ``hiding``. A failed connect keeps every line: libpq writes one per
    address it tried.
    """
    if isinstance(error, psycopg2.Error) and error.diag.message_primary:
        description = str(error.diag.message_primary)
    else:
        description = " ".join(str(error).split()) or type(error).__name__
    for secret in hiding:
        if secret:
            description = description.replace(secret, _MASK)
    return description


def connection_parameters(
    config: Config, target_session_attrs: str | None = None
) -> dict[str, Any]:
    """libpq connection parameters (DSN keywords) for ``config``'s database;
    ``target_session_attrs`` replaces the configured one."""
    parameters: dict[str, Any] = {
        # libpq tries each host in turn (one port for all, or one each) until one answers and
        # has the target_session_attrs; verify-full checks each host's own name.
        "host": config.postgres_host,
        "port": ",".join(str(port) for port in config.postgres_port),
        "target_session_attrs": target_session_attrs or config.postgres_target_session_attrs,
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


class ReconnectingConnection(Connection):
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
            # Of several hosts, the one libpq connected to.
            info = self._connection.info
            self.log.info(
                "connected to PostgreSQL {host}:{port}/{dbname}",
                host=info.host,
                port=info.port,
                dbname=where["dbname"],
            )
        elif not self._shut_down:
            reason = describe_postgres_error(result.value)
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
            self.log.warn(
                "lost connection to PostgreSQL: {reason}", reason=describe_postgres_error(error)
            )
            return error
        return None
