"""Waiting in tests, always with a deadline: for a Deferred, or for a condition no event
signals."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

TIMEOUT = 20


def bounded(waiting: Deferred[Any], seconds: float = TIMEOUT) -> Deferred[Any]:
    """``waiting``, failed with TimeoutError if it has not fired in ``seconds``."""
    return waiting.addTimeout(seconds, reactor)


async def wait_for(condition: Any, what: str, seconds: float = TIMEOUT) -> None:
    """Poll ``condition`` each reactor tick (where no event signals it) until true."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError(what)
        await deferLater(reactor, 0.02, lambda: None)
