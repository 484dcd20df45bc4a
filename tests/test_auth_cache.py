"""CachingAuthenticator: unit tests on a fake clock with a scripted inner authenticator, and a
reconnect storm against the real PostgresAuthenticator counting the queries it sends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from sse_twisted._auth import PostgresAuthenticator
from sse_twisted._auth_cache import CachingAuthenticator
from sse_twisted._config import load_config
from sse_twisted.interfaces import BackendUnavailable, IAuthenticator
from tests.fakes import ImmediateAuthenticator, PendingAuthenticator
from tests.waiting import bounded, wait_for

TTL = 10.0
ALICE = ("0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10", "3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31")
ALICE_OTHER_TAB = (ALICE[0], "5d2c8e1f-3a4b-4c6d-8e9f-0a1b2c3d4e5f")
BOB = ("9f8e7d6c-5b4a-4392-a1b0-c9d8e7f6a5b4", "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d")
CAROL = ("2d4f6a8c-0e1b-4d3f-9a7c-5e8b1d4f7a0c", "7c5a3e1d-9b8f-4e6d-a4c2-b0e8d6f4a2c0")


def caching(
    inner: IAuthenticator, ttl: float = TTL, size: int = 100
) -> tuple[CachingAuthenticator, Clock]:
    clock = Clock()
    return CachingAuthenticator(inner, clock, ttl_seconds=ttl, max_entries=size), clock


def result_of(checking: Deferred[Any]) -> Any:
    """The result a Deferred has already fired with (the failure's exception, if failed)."""
    outcome: list[Any] = []
    checking.addBoth(outcome.append)
    assert outcome, "the check has not answered"
    result = outcome[0]
    return result.value if isinstance(result, Failure) else result


def check_now(cache: CachingAuthenticator, pair: tuple[str, str]) -> Any:
    return result_of(cache.is_subscriber(*pair))


# --- unit tests: fake clock, scripted inner authenticator ---


def test_provides_the_authenticator_interface_and_reports_the_inner_connection() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    assert verifyObject(IAuthenticator, cache)
    assert cache.connected is True
    inner.connected = False
    assert cache.connected is False


def test_a_granted_pair_is_answered_from_the_cache_until_the_ttl_expires() -> None:
    inner = ImmediateAuthenticator(ALICE)
    cache, clock = caching(inner)
    assert check_now(cache, ALICE) is True
    clock.advance(TTL - 0.1)
    assert check_now(cache, ALICE) is True
    assert inner.asked == [ALICE]
    assert (cache.hits, cache.misses) == (1, 1)

    clock.advance(0.1)
    assert check_now(cache, ALICE) is True
    assert inner.asked == [ALICE, ALICE]  # expired: asked again
    assert (cache.hits, cache.misses) == (1, 2)


def test_the_ttl_counts_from_the_answer_not_from_the_last_hit() -> None:
    inner = ImmediateAuthenticator(ALICE)
    cache, clock = caching(inner)
    check_now(cache, ALICE)
    for _ in range(4):
        clock.advance(TTL / 4 - 0.01)
        check_now(cache, ALICE)
    assert len(inner.asked) == 1
    clock.advance(0.05)  # TTL after the answer, although the last hit was just now
    check_now(cache, ALICE)
    assert len(inner.asked) == 2


def test_a_refusal_is_never_cached() -> None:
    inner = ImmediateAuthenticator()
    cache, _ = caching(inner)
    assert check_now(cache, ALICE) is False
    # The row is added: the very next check lets the user in.
    inner.known.add(ALICE)
    assert check_now(cache, ALICE) is True
    assert inner.asked == [ALICE, ALICE]
    assert len(cache) == 1


def test_backend_unavailable_reaches_every_waiter_and_is_not_cached() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    first, second = cache.is_subscriber(*ALICE), cache.is_subscriber(*ALICE)
    inner.answer(BackendUnavailable("no live connection"))
    assert isinstance(result_of(first), BackendUnavailable)
    assert isinstance(result_of(second), BackendUnavailable)
    third = cache.is_subscriber(*ALICE)
    assert len(inner.asked) == 2  # asked again: the outage was not remembered
    inner.answer(True)
    assert result_of(third) is True


def test_the_cache_holds_at_most_max_entries_dropping_the_least_recently_used() -> None:
    inner = ImmediateAuthenticator(ALICE, BOB, CAROL)
    cache, _ = caching(inner, size=2)
    check_now(cache, ALICE)
    check_now(cache, BOB)
    check_now(cache, ALICE)  # a hit: Alice is now the most recently used
    check_now(cache, CAROL)  # evicts Bob
    assert len(cache) == 2
    assert inner.asked == [ALICE, BOB, CAROL]

    check_now(cache, ALICE)
    check_now(cache, CAROL)
    assert inner.asked == [ALICE, BOB, CAROL]  # both still cached
    check_now(cache, BOB)
    assert inner.asked == [ALICE, BOB, CAROL, BOB]  # Bob had gone
    assert len(cache) == 2


def test_concurrent_identical_checks_share_one_question() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    waiting = [cache.is_subscriber(*ALICE) for _ in range(5)]
    bob = cache.is_subscriber(*BOB)
    assert inner.pairs == [ALICE, BOB]
    assert (cache.misses, cache.coalesced) == (2, 4)

    inner.answer(True, index=0)
    assert [result_of(each) for each in waiting] == [True] * 5
    assert not bob.called  # another pair, its own question
    inner.answer(False, index=1)
    assert result_of(bob) is False


def test_a_waiter_that_leaves_does_not_cancel_the_question_for_the_others() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    leaving = cache.is_subscriber(*ALICE)
    staying = cache.is_subscriber(*ALICE)
    leaving.cancel()  # what the web resource does when the browser goes away
    assert isinstance(result_of(leaving), CancelledError)
    assert inner.cancelled == 0
    assert not staying.called

    inner.answer(True)
    assert result_of(staying) is True


def test_a_question_all_waiters_left_is_withdrawn_and_the_next_check_asks_again() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    waiting = [cache.is_subscriber(*ALICE) for _ in range(3)]
    for leaving in waiting[:2]:
        leaving.cancel()
        leaving.addErrback(lambda failure: failure.trap(CancelledError))
    assert inner.cancelled == 0  # one waiter is left
    waiting[2].cancel()
    waiting[2].addErrback(lambda failure: failure.trap(CancelledError))
    # Nobody waits: the question leaves the database's line before it is ever sent.
    assert inner.cancelled == 1
    again = cache.is_subscriber(*ALICE)
    assert len(inner.asked) == 2
    inner.answer(True)
    assert result_of(again) is True
    assert check_now(cache, ALICE) is True
    assert len(inner.asked) == 2


def test_a_check_joining_one_in_flight_costs_no_query() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    assert not cache.costs_no_query(*ALICE)
    first = cache.is_subscriber(*ALICE)
    assert cache.costs_no_query(*ALICE)
    assert not cache.costs_no_query(ALICE[0], "another-token")
    joined = cache.is_subscriber(*ALICE)
    assert len(inner.asked) == 1
    inner.answer(False)
    assert (result_of(first), result_of(joined)) == (False, False)
    assert not cache.costs_no_query(*ALICE)


def test_costs_no_query_tells_a_live_grant_without_counting_a_hit() -> None:
    inner = ImmediateAuthenticator(ALICE)
    clock = Clock()
    cache = CachingAuthenticator(inner, clock, ttl_seconds=TTL, max_entries=10)
    assert not cache.costs_no_query(*ALICE)
    check_now(cache, ALICE)
    assert cache.costs_no_query(*ALICE)
    assert (cache.hits, cache.misses) == (0, 1)
    clock.advance(TTL)
    assert not cache.costs_no_query(*ALICE)


def test_a_waiter_cancelled_by_another_waiters_callback_is_not_fired_twice() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    first = cache.is_subscriber(*ALICE)
    second = cache.is_subscriber(*ALICE)
    first.addCallback(lambda _: second.cancel())
    inner.answer(True)
    assert result_of(first) is None
    assert isinstance(result_of(second), CancelledError)


def test_invalidate_drops_every_pair_of_that_user_and_only_those() -> None:
    inner = ImmediateAuthenticator(ALICE, ALICE_OTHER_TAB, BOB)
    cache, _ = caching(inner)
    for pair in (ALICE, ALICE_OTHER_TAB, BOB):
        check_now(cache, pair)
    assert len(cache) == 3

    cache.invalidate(ALICE[0])
    assert len(cache) == 1
    inner.known -= {ALICE, ALICE_OTHER_TAB}  # the revocation
    assert check_now(cache, ALICE) is False
    assert check_now(cache, ALICE_OTHER_TAB) is False
    assert check_now(cache, BOB) is True
    assert inner.asked[3:] == [ALICE, ALICE_OTHER_TAB]  # Bob was still cached
    cache.invalidate(ALICE[0])  # nothing left to drop: no error
    cache.invalidate(CAROL[0])


def test_a_yes_read_before_a_revocation_is_asked_again_and_not_cached() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    waiting = cache.is_subscriber(*ALICE)
    cache.invalidate(ALICE[0])  # the NOTIFY overtakes the query's answer
    inner.answer(True, index=0)  # read from a snapshot taken before the DELETE
    assert not waiting.called
    assert inner.pairs == [ALICE, ALICE]  # asked again, after the revocation
    inner.answer(False)
    assert result_of(waiting) is False
    assert len(cache) == 0


def test_a_check_made_after_a_revocation_does_not_join_the_question_before_it() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    before = cache.is_subscriber(*ALICE)
    cache.invalidate(ALICE[0])
    after = cache.is_subscriber(*ALICE)
    assert inner.pairs == [ALICE, ALICE]  # a fresh question
    inner.answer(True, index=0)  # the old question answers yes: it follows the fresh one
    assert len(inner.asked) == 2
    assert not before.called
    inner.answer(False, index=1)
    assert (result_of(before), result_of(after)) == (False, False)
    assert len(cache) == 0


def test_a_refusal_read_before_a_revocation_is_delivered_as_is() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner)
    waiting = cache.is_subscriber(*ALICE)
    cache.invalidate(ALICE[0])
    inner.answer(False)
    assert result_of(waiting) is False
    assert len(inner.asked) == 1


def test_clear_forgets_every_user() -> None:
    inner = ImmediateAuthenticator(ALICE, BOB)
    cache, _ = caching(inner)
    check_now(cache, ALICE)
    check_now(cache, BOB)
    cache.clear()
    assert len(cache) == 0
    check_now(cache, ALICE)
    assert inner.asked == [ALICE, BOB, ALICE]


def test_a_zero_ttl_caches_nothing_but_still_shares_concurrent_checks() -> None:
    inner = PendingAuthenticator()
    cache, _ = caching(inner, ttl=0)
    waiting = [cache.is_subscriber(*ALICE) for _ in range(3)]
    assert len(inner.asked) == 1
    inner.answer(True)
    assert [result_of(each) for each in waiting] == [True] * 3
    later = cache.is_subscriber(*ALICE)
    assert len(inner.asked) == 2
    inner.answer(True)
    assert result_of(later) is True
    assert len(cache) == 0


def test_expired_entries_leave_the_per_user_index_too() -> None:
    inner = ImmediateAuthenticator(ALICE)
    cache, clock = caching(inner)
    check_now(cache, ALICE)
    clock.advance(TTL)
    inner.known.clear()
    assert check_now(cache, ALICE) is False  # expired, asked, refused
    assert len(cache) == 0
    cache.invalidate(ALICE[0])  # the index holds nothing stale that would raise


def test_an_inner_authenticator_that_answers_at_once_is_handled() -> None:
    inner = ImmediateAuthenticator(ALICE)
    cache, _ = caching(inner)
    assert check_now(cache, ALICE) is True
    assert check_now(cache, BOB) is False
    assert (cache.hits, cache.misses, cache.coalesced) == (0, 2, 0)


# --- a reconnect storm against the real PostgreSQL ---


@pytest.fixture
def users(local_database: dict[str, str]) -> list[tuple[str, str]]:
    """Five new (userid, token) rows in the local database's ``users``."""
    pairs = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(5)]
    database = local_database["SSE_POSTGRES_DB_NAME"]
    with (
        closing(psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database)) as db,
        db,
        db.cursor() as cursor,
    ):
        cursor.executemany("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", pairs)
    return pairs


@pytest_twisted.async_yield_fixture
async def postgres_authenticator(
    local_database: dict[str, str], tmp_path: Path
) -> AsyncIterator[PostgresAuthenticator]:
    """A started PostgresAuthenticator on the local database, connected."""
    config = load_config({**local_database, "SSE_CERTS_DIR": str(tmp_path)})
    authenticator = PostgresAuthenticator(config, reactor)
    assert authenticator.queries == 0
    authenticator.startService()
    try:
        await wait_for(lambda: authenticator.connected, "a PostgreSQL connection")
        yield authenticator
    finally:
        await authenticator.stopService()


@pytest_twisted.ensureDeferred
async def test_a_storm_of_1000_subscribes_for_5_users_costs_at_most_5_queries(
    postgres_authenticator: PostgresAuthenticator,
    users: list[tuple[str, str]],
) -> None:
    cache = CachingAuthenticator(postgres_authenticator, reactor, ttl_seconds=10, max_entries=100)
    storm = [cache.is_subscriber(*users[index % 5]) for index in range(1000)]
    answers = await bounded(gatherResults(storm))
    assert answers == [True] * 1000
    assert postgres_authenticator.queries == 5  # one per pair
    assert (cache.misses, cache.coalesced) == (5, 995)

    # The browsers of the second wave find every pair cached.
    again = [cache.is_subscriber(*users[index % 5]) for index in range(1000)]
    assert all(result_of(each) is True for each in again)
    assert postgres_authenticator.queries <= 5
    assert cache.hits == 1000


@pytest_twisted.ensureDeferred
async def test_without_the_cache_the_same_storm_costs_a_query_per_subscribe(
    postgres_authenticator: PostgresAuthenticator,
    users: list[tuple[str, str]],
) -> None:
    # The baseline the previous test is measured against: the counter does count.
    storm = [postgres_authenticator.is_subscriber(*users[index % 5]) for index in range(200)]
    results = await bounded(DeferredList(storm, consumeErrors=True))
    assert all(success and answer is True for success, answer in results)
    assert postgres_authenticator.queries == 200


@pytest.mark.parametrize("ttl", [0.0, 10.0])
@pytest_twisted.ensureDeferred
async def test_a_storm_of_cancelled_checks_leaves_the_survivors_answered(
    postgres_authenticator: PostgresAuthenticator, users: list[tuple[str, str]], ttl: float
) -> None:
    cache = CachingAuthenticator(postgres_authenticator, reactor, ttl_seconds=ttl, max_entries=10)
    checks = [cache.is_subscriber(*users[index % 5]) for index in range(100)]
    for leaving in checks[::2]:
        leaving.cancel()
    results = await bounded(DeferredList(checks, consumeErrors=True))
    survivors = [answer for success, answer in results[1::2]]
    assert survivors == [True] * 50
    assert all(isinstance(answer, Failure) for _, answer in results[::2])
    assert postgres_authenticator.queries == 5
