"""Revocations pushed by PostgreSQL: a trigger on ``users`` NOTIFYs, and open streams close.

``schema/users.sql`` installs the trigger: deleting a row, or changing its ``uuid`` or
``sse_token``, sends the old ``uuid`` on channel ``sse_revocations``. One dedicated
connection LISTENs; it reconnects like the authenticator's pool and LISTENs again each time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._auth import _OUTAGES, _connection_parameters, _describe, _ReconnectingConnection
from ._config import Config

if TYPE_CHECKING:
    from ._auth_cache import CachingAuthenticator
    from ._streams import StreamRegistry

__all__ = ["CHANNEL", "RevocationEnforcer", "RevocationListener"]

CHANNEL = "sse_revocations"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
_PAYLOAD_SHOWN = 64


class RevocationListener(Service):
    """LISTENs on ``sse_revocations`` and calls ``on_revoked(userid)`` for each notification.

    Starting never fails: a connection that cannot open keeps retrying in the background.
    Notifications sent while the connection is down are lost, so after every LISTEN
    (the first included: streams may have opened before it) ``on_resynchronised`` is called
    for the caller to drop whatever a missed revocation could have left stale.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        on_revoked: Callable[[str], None],
        on_resynchronised: Callable[[], None] | None = None,
    ) -> None:
        """Build the connection without connecting; ``reactor`` must provide IReactorTime
        and IReactorFDSet."""
        self._config = config
        self._on_revoked = on_revoked
        self._on_resynchronised = on_resynchronised
        # txpostgres hands notifications to observers through a cooperator; its default one
        # runs on the global reactor.
        self._cooperator = Cooperator(scheduler=partial(reactor.callLater, 0))
        self._connection = _ReconnectingConnection(
            reactor, self._cooperator, config.postgres_timeout_seconds
        )
        self._connection.addNotifyObserver(self._notified)
        self._connection.detector.addRecoveryHandler(self._reconnected)
        # The psycopg2 connection LISTEN last succeeded on: each reconnection makes a new one.
        self._listening_on: object | None = None

    @property
    def listening(self) -> bool:
        """True while notifications can arrive: connected, and LISTEN done on this connection."""
        return (
            self._connection.alive
            and self._listening_on is not None
            and self._connection.pollable() is self._listening_on
        )

    def startService(self) -> None:
        """Connect and LISTEN, retrying in the background until it works."""
        super().startService()
        first = self._connection.open(**_connection_parameters(self._config))
        first.addCallback(self._first_attempt_over)

    def stopService(self) -> Deferred[None]:
        """Close the connection and stop reconnecting."""
        super().stopService()
        self._listening_on = None
        self._connection.shut_down()
        return succeed(None)

    def _first_attempt_over(self, _: None) -> None:
        # A failed first attempt is retried by the detector, which then calls _reconnected.
        if self.running and self._connection.alive:
            self._listen()

    def _reconnected(self) -> None:
        if self.running:
            self._listen()

    def _listen(self) -> None:
        connection = self._connection.pollable()
        listening: Deferred[None] = self._connection.runOperation(f"LISTEN {CHANNEL}")
        listening.addCallbacks(self._listened, self._not_listening, callbackArgs=(connection,))

    def _listened(self, _: None, connection: object) -> None:
        self._listening_on = connection
        self.log.info("listening for revocations on PostgreSQL channel {channel}", channel=CHANNEL)
        if self._on_resynchronised is not None:
            try:
                self._on_resynchronised()
            except Exception:
                self.log.failure("cannot resynchronise after LISTEN")

    def _not_listening(self, failure: Failure) -> None:
        if not self.running:
            return
        # A lost connection is reconnected by the detector, which LISTENs again.
        if failure.check(*_OUTAGES):
            self.log.warn(
                "cannot LISTEN for revocations yet: {reason}", reason=_describe(failure.value)
            )
        else:
            self.log.failure("cannot LISTEN for revocations", failure)

    def _notified(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        payload: str = notify.payload
        if not _UUID.match(payload):
            self.log.warn(
                "ignored a revocation whose payload is not a user id: {payload!r}",
                payload=payload[:_PAYLOAD_SHOWN],
            )
            return
        try:
            self._on_revoked(payload.lower())
        except Exception:
            self.log.failure("cannot apply the revocation of {userid}", userid=payload)


class RevocationEnforcer:
    """Applies a revocation: forgets the user's cached grants, then closes its open streams.

    Each closed browser reconnects and is checked afresh: a revoked pair gets 403 and its
    EventSource stops; a pair still valid (another token of the user changed) resumes.
    """

    log = Logger()

    def __init__(self, cache: CachingAuthenticator, registry: StreamRegistry) -> None:
        self._cache = cache
        self._registry = registry

    def revoke(self, userid: str) -> None:
        """Forget ``userid``'s grants and close its streams."""
        self._cache.invalidate(userid)
        closed = self._registry.close_user(userid)
        self.log.info(
            "access revoked for {userid}: {closed} open streams closed",
            userid=userid,
            closed=closed,
        )

    def resynchronise(self) -> None:
        """Forget every cached grant: revocations may have been missed."""
        self._cache.clear()
