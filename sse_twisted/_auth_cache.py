"""A short-lived cache of granted subscriptions, and one query for identical concurrent checks.

A deploy makes every browser reconnect at once, and each subscribe would cost a PostgreSQL
round trip. Only "allowed" is cached: a refusal or an outage is asked again next time, so a
new user is let in at once and a database that comes back is noticed at once.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import partial

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from .interfaces import IAuthenticator

__all__ = ["CachingAuthenticator"]

_Pair = tuple[str, str]


class _Lookup:
    """One question to the inner authenticator, and the callers waiting for its answer."""

    __slots__ = ("asking", "pair", "revoked", "waiters")

    def __init__(self, pair: _Pair) -> None:
        self.pair = pair
        self.waiters: list[Deferred[bool]] = []
        # The question to the inner authenticator, withdrawn when every waiter has left.
        self.asking: Deferred[bool] | None = None
        # The user was revoked while the question was out: a "yes" may predate it.
        self.revoked = False


def _abandon(lookup: _Lookup, waiter: Deferred[bool]) -> None:
    """A caller gave up: stop waiting for it (Deferred then fails it as cancelled), and
    withdraw the question when nobody else waits, so that it never reaches a database that
    has not been asked yet."""
    if waiter in lookup.waiters:
        lookup.waiters.remove(waiter)
    if not lookup.waiters and lookup.asking is not None:
        lookup.asking.cancel()


def _deliver(result: bool | Failure, lookup: _Lookup) -> None:
    """Fire every waiter of ``lookup`` with ``result``."""
    waiters, lookup.waiters = lookup.waiters, []
    for waiter in waiters:
        # A waiter's callbacks may cancel another waiter of the same lookup.
        if waiter.called:
            continue
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


@implementer(IAuthenticator)
class CachingAuthenticator:
    """Remembers granted (userid, nonce) pairs for ``ttl_seconds``, at most ``max_entries``
    of them (least recently used go first), and asks ``inner`` once for identical checks
    made while one is in flight.

    A caller that cancels its check (the browser left) stops only its own wait; the shared
    question runs on for the others, and is withdrawn (cancelled) when the last one leaves.
    L{invalidate} forgets a user at once, including a question already in flight: it is
    asked again, so a revocation is never outrun by an answer read before it.
    With ``ttl_seconds`` 0 nothing is cached but identical checks are still shared.

    @ivar hits: checks answered from the cache.
    @ivar misses: checks that asked ``inner``.
    @ivar coalesced: checks that joined a question already in flight.
    """

    def __init__(
        self,
        inner: IAuthenticator,
        clock: IReactorTime,
        ttl_seconds: float,
        max_entries: int,
    ) -> None:
        self._inner = inner
        self._clock = clock
        self._ttl_seconds = ttl_seconds
        self._max_entries = max_entries
        # pair -> expiry time, least recently used first.
        self._granted: OrderedDict[_Pair, float] = OrderedDict()
        # userid -> its cached nonces, so that invalidate() touches only that user's pairs.
        self._nonces_by_user: dict[str, set[str]] = {}
        self._in_flight: dict[str, dict[str, _Lookup]] = {}
        self.hits = 0
        self.misses = 0
        self.coalesced = 0

    @property
    def connected(self) -> bool:
        """Whether the inner authenticator can answer queries."""
        return bool(self._inner.connected)

    def __len__(self) -> int:
        """How many granted pairs are cached (expired ones included until touched)."""
        return len(self._granted)

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        """Fire with whether the pair may subscribe, from the cache when it can.

        Fails like the inner authenticator (L{BackendUnavailable}); cancelling the result
        fails it with L{CancelledError} and leaves every other caller waiting.
        """
        pair = (userid, nonce)
        if self._cached(pair):
            self.hits += 1
            return succeed(True)
        lookup = self._in_flight.get(userid, {}).get(nonce)
        asking = lookup is None
        if lookup is None:
            self.misses += 1
            lookup = _Lookup(pair)
            self._in_flight.setdefault(userid, {})[nonce] = lookup
        else:
            self.coalesced += 1
        waiter: Deferred[bool] = Deferred(canceller=partial(_abandon, lookup))
        lookup.waiters.append(waiter)
        if asking:
            # Only now: the inner authenticator may answer at once.
            self._ask(lookup)
        return waiter

    def invalidate(self, userid: str) -> None:
        """Forget every granted pair of ``userid``; a check in flight for it that comes back
        "yes" is asked again, as its answer may have been read before the revocation."""
        for nonce in self._nonces_by_user.pop(userid, ()):
            del self._granted[(userid, nonce)]
        for lookup in self._in_flight.pop(userid, {}).values():
            lookup.revoked = True

    def clear(self) -> None:
        """Forget every granted pair, and ask again every check in flight."""
        self._granted.clear()
        self._nonces_by_user.clear()
        for lookups in self._in_flight.values():
            for lookup in lookups.values():
                lookup.revoked = True
        self._in_flight.clear()

    def _cached(self, pair: _Pair) -> bool:
        expiry = self._granted.get(pair)
        if expiry is None:
            return False
        if expiry <= self._clock.seconds():
            self._forget(pair)
            return False
        self._granted.move_to_end(pair)
        return True

    def costs_no_query(self, userid: str, nonce: str) -> bool:
        """Whether the pair is granted from the cache now, or a check of it is in flight
        already and a new one would only join it (counted as neither hit nor miss)."""
        expiry = self._granted.get((userid, nonce))
        if expiry is not None and expiry > self._clock.seconds():
            return True
        return nonce in self._in_flight.get(userid, {})

    def _ask(self, lookup: _Lookup) -> None:
        # Cancelled only when every waiter has left; the inner authenticator bounds it with
        # its own timeout.
        asking = self._inner.is_subscriber(*lookup.pair)
        lookup.asking = asking
        asking.addBoth(self._answered, lookup)

    def _answered(self, result: bool | Failure, lookup: _Lookup) -> None:
        lookup.asking = None
        if lookup.revoked and result is True:
            # Perhaps read before the revocation was committed: a question asked after it
            # decides.
            self._ask_again(lookup)
            return
        userid, nonce = lookup.pair
        in_flight = self._in_flight.get(userid)
        if in_flight is not None and in_flight.get(nonce) is lookup:
            del in_flight[nonce]
            if not in_flight:
                del self._in_flight[userid]
        if result is True:
            self._remember(lookup.pair)
        _deliver(result, lookup)

    def _ask_again(self, lookup: _Lookup) -> None:
        lookup.revoked = False
        userid, nonce = lookup.pair
        newer = self._in_flight.get(userid, {}).get(nonce)
        if newer is None:
            self._in_flight.setdefault(userid, {})[nonce] = lookup
            self._ask(lookup)
            return
        # A check made since the revocation is already asking: follow its answer.
        following: Deferred[bool] = Deferred(canceller=partial(_abandon, newer))
        newer.waiters.append(following)
        lookup.asking = following
        following.addBoth(_deliver, lookup)

    def _remember(self, pair: _Pair) -> None:
        if self._ttl_seconds <= 0:
            return
        self._granted[pair] = self._clock.seconds() + self._ttl_seconds
        self._granted.move_to_end(pair)
        self._nonces_by_user.setdefault(pair[0], set()).add(pair[1])
        while len(self._granted) > self._max_entries:
            oldest = next(iter(self._granted))
            self._forget(oldest)

    def _forget(self, pair: _Pair) -> None:
        del self._granted[pair]
        userid, nonce = pair
        nonces = self._nonces_by_user[userid]
        nonces.discard(nonce)
        if not nonces:
            del self._nonces_by_user[userid]
