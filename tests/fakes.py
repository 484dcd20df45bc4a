"""In-memory authenticators for unit tests, each a full L{IAuthenticator} (checked with
``verifyObject`` in tests/test_fakes.py): tests import these instead of writing their own."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from sse_twisted.interfaces import IAuthenticator

__all__ = ["ImmediateAuthenticator", "PendingAuthenticator", "ScriptedAuthenticator"]

Pair = tuple[str, str]


@implementer(IAuthenticator)
class ImmediateAuthenticator:
    """Answers at once from a fixed set of known (userid, nonce) pairs, as a users table
    would; with ``admit_everyone``, every pair is a subscriber."""

    def __init__(self, *known: Pair, admit_everyone: bool = False) -> None:
        self.connected = True
        self.known = set(known)
        self.admit_everyone = admit_everyone
        self.asked: list[Pair] = []

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        self.asked.append((userid, nonce))
        return succeed(self.admit_everyone or (userid, nonce) in self.known)

    def costs_no_query(self, userid: str, nonce: str) -> bool:
        return False


@implementer(IAuthenticator)
class PendingAuthenticator:
    """Answers nothing by itself: each check (and each L{probe}, as
    L{PostgresAuthenticator.probe} has) waits until the test answers it."""

    def __init__(self) -> None:
        self.connected = True
        self.asked: list[tuple[Pair, Deferred[bool]]] = []
        self.cancelled = 0
        self.probes: list[Deferred[bool]] = []

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        answer: Deferred[bool] = Deferred(canceller=self._cancelled)
        self.asked.append(((userid, nonce), answer))
        return answer

    def _cancelled(self, _: Deferred[bool]) -> None:
        self.cancelled += 1

    def costs_no_query(self, userid: str, nonce: str) -> bool:
        return False

    def probe(self) -> Deferred[bool]:
        """A readiness probe, answered by the test through L{probes}."""
        question: Deferred[bool] = Deferred()
        self.probes.append(question)
        return question

    def answer(self, result: bool | Exception, index: int = -1) -> None:
        """Fire check ``index`` (the latest by default)."""
        _, pending = self.asked[index]
        if isinstance(result, Exception):
            pending.errback(result)
        else:
            pending.callback(result)

    @property
    def pairs(self) -> list[Pair]:
        """The pairs asked about, in order."""
        return [pair for pair, _ in self.asked]


@implementer(IAuthenticator)
class ScriptedAuthenticator:
    """Answers each check with the next scripted result: a bool, an exception to fail
    with, or a Deferred the test fires; pairs in ``cached`` cost no query."""

    def __init__(self, *answers: bool | Exception | Deferred[bool]) -> None:
        self.connected = True
        self.answers = list(answers)
        self.asked: list[Pair] = []
        self.cached: set[Pair] = set()

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        self.asked.append((userid, nonce))
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)

    def costs_no_query(self, userid: str, nonce: str) -> bool:
        return (userid, nonce) in self.cached
