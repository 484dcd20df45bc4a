"""Revocations pushed by PostgreSQL: a trigger on ``users`` NOTIFYs, and open streams are
re-checked.

``schema/users.sql`` installs the triggers: deleting a row, or changing its ``uuid`` or
``sse_token``, sends the old ``uuid`` on channel ``sse_revocations``; ``TRUNCATE users``
sends ``*``. One dedicated connection, to the primary, LISTENs; it reconnects like the
authenticator's pool and LISTENs again each time.

A notification is only a hint: any role may NOTIFY that channel, and notifications sent
while the connection is down are lost. So nothing is closed on its word: the affected
streams' (userid, token) pairs are asked of the database, and only those it no longer
grants are closed. They are asked on that same connection to the primary, never of a
standby the subscriber checks may read: the primary sends a notification at its commit,
which a standby may not have replayed yet, and would still grant the pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.reconnection import ConnectionDead

from ._config import Config
from ._postgres import (
    OUTAGES,
    ReconnectingConnection,
    connection_parameters,
    describe_postgres_error,
)
from ._uuids import is_uuid
from .interfaces import BackendUnavailable

if TYPE_CHECKING:
    from ._auth_cache import CachingAuthenticator
    from ._streams import EventStream, StreamRegistry

__all__ = ["CHANNEL", "RevocationEnforcer", "RevocationListener"]

_Pair = tuple[str, str]

CHANNEL = "sse_revocations"
# The pairs come as two arrays, zipped by unnest: one statement for any number of pairs.
_GRANTED_QUERY = (
    "SELECT uuid, sse_token FROM users WHERE (uuid, sse_token) IN "
    "(SELECT * FROM unnest(%s::varchar[], %s::varchar[]))"
)
_NO_PRIMARY = "no live connection to the PostgreSQL primary (reconnecting)"
_PAYLOAD_SHOWN = 64
# Pairs asked in one query: a few hundred keep each query well within the timeout.
_BATCH_PAIRS = 500
_FIRST_RETRY_SECONDS = 1.0
_LAST_RETRY_SECONDS = 30.0
# Sent by the TRUNCATE trigger: every grant may be gone.
_EVERYONE = "*"


class RevocationListener(Service):
    """LISTENs on ``sse_revocations`` and calls ``on_revoked(userid)`` for each notification;
    L{granted} asks the primary, on that same connection, which pairs are still granted.

    Starting never fails: a connection that cannot open keeps retrying in the background.
    Notifications sent while the connection is down are lost, so after every LISTEN
    (the first included: streams may have opened before it) ``on_resynchronised`` is called
    for the caller to re-check whatever a missed revocation could have left stale. A ``*``
    (``TRUNCATE users``) calls it too.
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
        self._reactor = reactor
        self._on_revoked = on_revoked
        self._on_resynchronised = on_resynchronised
        # txpostgres hands notifications to observers through a cooperator; its default one
        # runs on the global reactor.
        self._cooperator = Cooperator(scheduler=partial(reactor.callLater, 0))
        self._connection = ReconnectingConnection(
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
        # Only the primary runs the triggers that NOTIFY, and a standby refuses LISTEN: of
        # several hosts, this connection must reach the primary, whatever the pool may use.
        parameters = connection_parameters(self._config, target_session_attrs="primary")
        first = self._connection.open(**parameters)
        first.addCallback(self._first_attempt_over)

    def stopService(self) -> Deferred[None]:
        """Close the connection and stop reconnecting."""
        super().stopService()
        self._listening_on = None
        self._connection.shut_down()
        return succeed(None)

    def granted(self, pairs: Sequence[_Pair]) -> Deferred[set[_Pair]]:
        """Fire with those of the (userid, nonce) ``pairs`` that are in ``users`` on the
        primary, asked in one query; fail with L{BackendUnavailable} while there is no
        connection to it, or when it does not answer within ``postgres_timeout_seconds``.

        txpostgres runs the connection's queries (LISTEN included) one at a time, and hands
        over the notifications that arrive during one once it is over.
        """
        if not self._connection.alive:
            return fail(BackendUnavailable(_NO_PRIMARY))
        sent: Deferred[list[_Pair]] = self._connection.runQuery(
            _GRANTED_QUERY, ([userid for userid, _ in pairs], [nonce for _, nonce in pairs])
        )
        # Waited on through a Deferred without canceller, as the pool's checks are:
        # cancelling txpostgres's own raises out of cancel() and blocks the reactor in
        # libpq's PQcancel. The query itself ends at the server's statement_timeout.
        answer: Deferred[list[_Pair]] = Deferred()
        sent.chainDeferred(answer)
        answer.addTimeout(self._config.postgres_timeout_seconds, self._reactor)
        return answer.addCallbacks(
            lambda rows: {(userid, nonce) for userid, nonce in rows},
            self._granted_unanswered,
            errbackArgs=(pairs,),
        )

    def _granted_unanswered(self, failure: Failure, pairs: Sequence[_Pair]) -> Failure:
        if failure.check(ConnectionDead):
            reason = _NO_PRIMARY
        elif failure.check(DeferredTimeoutError):
            reason = f"no answer within {self._config.postgres_timeout_seconds} seconds"
        elif failure.check(psycopg2.Error, *OUTAGES):
            reason = describe_postgres_error(failure.value, hiding=[nonce for _, nonce in pairs])
        else:
            return failure
        raise BackendUnavailable(reason)

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
        self._resynchronise()

    def _resynchronise(self) -> None:
        if self._on_resynchronised is not None:
            try:
                self._on_resynchronised()
            except Exception:
                self.log.failure("cannot resynchronise revocations")

    def _not_listening(self, failure: Failure) -> None:
        if not self.running:
            return
        # A lost connection is reconnected by the detector, which LISTENs again.
        if failure.check(*OUTAGES):
            self.log.warn(
                "cannot LISTEN for revocations yet: {reason}",
                reason=describe_postgres_error(failure.value),
            )
        else:
            self.log.failure("cannot LISTEN for revocations", failure)

    def _notified(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        payload: str = notify.payload
        if payload == _EVERYONE:
            self.log.info("every grant may be revoked (users truncated): re-checking all")
            self._resynchronise()
            return
        if not is_uuid(payload):
            self.log.warn(
                "ignored a revocation whose payload is not a user id: {payload!r}",
                payload=payload[:_PAYLOAD_SHOWN],
            )
            return
        try:
            self._on_revoked(payload.lower())
        except Exception:
            self.log.failure("cannot apply the revocation of {userid}", userid=payload)


class RevocationEnforcer(Service):
    """Re-checks open streams against the database and closes those no longer granted.

    A notification for a user re-checks that user's streams; a resynchronisation (each
    LISTEN, a TRUNCATE) re-checks every stream. The (userid, token) pairs go to
    ``granted`` in batches, one query at a time; notifications arriving meanwhile are
    coalesced per user into the next round, so a flood of them costs at most one query per
    batch of affected pairs. When the database cannot answer, the streams stay open and
    the round is tried again later, backing off. Each closed browser reconnects after its
    retry delay and is refused (403, its EventSource stops), or let in again if it got a
    new grant meanwhile.

    @ivar queries: grant queries sent.
    """

    log = Logger()

    def __init__(
        self,
        cache: CachingAuthenticator,
        registry: StreamRegistry,
        granted: Callable[[Sequence[_Pair]], Deferred[set[_Pair]]],
        clock: IReactorTime,
        batch_pairs: int = _BATCH_PAIRS,
    ) -> None:
        self._cache = cache
        self._registry = registry
        self._granted = granted
        self._clock = clock
        self._batch_pairs = batch_pairs
        self._pending_users: set[str] = set()
        self._everyone_pending = False
        self._checking: Deferred[None] | None = None
        self.queries = 0

    @property
    def idle(self) -> bool:
        """True when no re-check is running, waiting to retry, or pending."""
        return self._checking is None

    def stopService(self) -> Deferred[None] | None:
        """Stop re-checking (a pending retry is dropped)."""
        super().stopService()
        if self._checking is not None:
            self._checking.cancel()
        return None

    def revoke(self, userid: str) -> None:
        """``userid`` may have lost a grant: forget its cached ones, then re-check its streams."""
        self._cache.invalidate(userid)
        self._pending_users.add(userid)
        self._check_soon()

    def resynchronise(self) -> None:
        """Any grant may be gone: forget every cached one, then re-check every stream."""
        self._cache.clear()
        self._everyone_pending = True
        self._check_soon()

    def _check_soon(self) -> None:
        if self._checking is None:
            # Set before the callback: the rounds may all be over at once.
            self._checking = Deferred.fromCoroutine(self._check_rounds())
            self._checking.addBoth(self._rounds_over)

    def _rounds_over(self, result: Failure | None) -> None:
        self._checking = None
        if isinstance(result, Failure) and not result.check(CancelledError):
            self.log.failure("cannot re-check open streams", result)

    async def _check_rounds(self) -> None:
        retry_seconds = _FIRST_RETRY_SECONDS
        while self._everyone_pending or self._pending_users:
            everyone, users = self._everyone_pending, self._pending_users
            self._everyone_pending, self._pending_users = False, set()
            if everyone:
                streams = list(self._registry)
            else:
                streams = [stream for user in users for stream in self._registry.streams_of(user)]
            closed: dict[str, int] = {}
            try:
                await self._check(streams, closed)
            except BaseException as error:
                # Asked again: by the retry below, or (after an unexpected error, logged
                # by _rounds_over) with the next notification. One that came meanwhile
                # has joined the pending ones.
                self._everyone_pending |= everyone
                self._pending_users |= users
                self._report_closed(closed)
                if not isinstance(error, BackendUnavailable):
                    raise
                self.log.warn(
                    "cannot re-check {count} open streams against PostgreSQL, they stay open;"
                    " retrying in {seconds} s: {reason}",
                    count=len(streams),
                    seconds=retry_seconds,
                    reason=str(error),
                )
                await deferLater(self._clock, retry_seconds)
                retry_seconds = min(retry_seconds * 2, _LAST_RETRY_SECONDS)
                continue
            retry_seconds = _FIRST_RETRY_SECONDS
            self._report(everyone, users, streams, closed)

    async def _check(self, streams: list[EventStream], closed: dict[str, int]) -> None:
        """Close the streams whose pair is not granted, counting them by user in ``closed``."""
        by_pair: dict[_Pair, list[EventStream]] = {}
        for stream in streams:
            by_pair.setdefault((stream.userid, stream.nonce), []).append(stream)
        pairs = list(by_pair)
        for start in range(0, len(pairs), self._batch_pairs):
            batch = pairs[start : start + self._batch_pairs]
            self.queries += 1
            granted = await self._granted(batch)
            for pair in batch:
                if pair in granted:
                    continue
                for stream in by_pair[pair]:
                    # It may have closed while the query was out.
                    if stream.is_open:
                        stream.close()
                        closed[pair[0]] = closed.get(pair[0], 0) + 1

    def _report_closed(self, closed: dict[str, int]) -> None:
        for userid, count in closed.items():
            self.log.info(
                "access revoked for {userid}: {closed} open streams closed",
                userid=userid,
                closed=count,
            )

    def _report(
        self, everyone: bool, users: set[str], streams: list[EventStream], closed: dict[str, int]
    ) -> None:
        self._report_closed(closed)
        if everyone:
            self.log.info(
                "re-checked {checked} open streams against PostgreSQL: {closed} closed",
                checked=len(streams),
                closed=sum(closed.values()),
            )
            return
        checked = {stream.userid for stream in streams}
        for userid in users - closed.keys():
            if userid not in checked:
                self.log.info("revocation notice for {userid}: no open stream here", userid=userid)
                continue
            # A forged NOTIFY, or another of the user's tokens changed.
            self.log.info(
                "revocation notice for {userid}: the database still grants its {kept}"
                " open streams here, none closed",
                userid=userid,
                kept=self._registry.count_of(userid),
            )
