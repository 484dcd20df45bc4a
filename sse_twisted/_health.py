"""``GET /healthz`` (the process answers) and ``GET /readyz`` (it can serve streams).

Both live on the public TLS port, where load balancers and Kubernetes probe. Readiness
needs RabbitMQ consuming and PostgreSQL answering a real query: a pool connection that
looks open can still sit behind a dead network path or a missing ``users`` table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from .interfaces import BackendUnavailable

__all__ = [
    "ConsumerCheck",
    "DependencyState",
    "LivenessResource",
    "PostgresCheck",
    "ReadinessResource",
]


@dataclass(frozen=True)
class DependencyState:
    """What readiness knows about one backend: ready or not, a state word and why."""

    ready: bool
    state: str
    reason: str | None = None


class ReadinessCheck(Protocol):
    """One dependency of readiness; ``check`` fires (never fails) with its state."""

    name: str

    def check(self) -> Deferred[DependencyState]: ...


class _Probed(Protocol):
    @property
    def connected(self) -> bool: ...

    def probe(self) -> Deferred[bool]: ...


class _ConsumerState(Protocol):
    @property
    def consuming(self) -> bool: ...

    @property
    def behind(self) -> str | None: ...


class ConsumerCheck:
    """RabbitMQ is ready while the stream consumer is registered with the broker and has
    reached the stream's tail: an instance still reading back the replay window after
    start, or checking its position after a reconnection, is not ready."""

    name = "rabbitmq"

    def __init__(self, consumer: _ConsumerState, queue: str) -> None:
        self._consumer = consumer
        self._queue = queue

    def check(self) -> Deferred[DependencyState]:
        """The consumer's flag: a dead link is noticed by AMQP heartbeats."""
        if not self._consumer.consuming:
            return succeed(
                DependencyState(
                    False, "not consuming", f"not consuming {self._queue}: reconnecting"
                )
            )
        behind = self._consumer.behind
        if behind is not None:
            return succeed(DependencyState(False, behind, f"{behind} {self._queue}"))
        return succeed(DependencyState(True, "consuming"))


class PostgresCheck:
    """PostgreSQL is ready when the subscribe query answers within ``timeout_seconds``.

    Probes share one query while it runs, and an answer serves every probe for
    ``fresh_seconds``: however many probers there are (and the port is public), PostgreSQL
    sees at most about one probe query per ``fresh_seconds``. With no live connection the
    answer is immediate and costs no query. The probe goes ahead of the subscriber checks
    waiting for a connection (L{PostgresAuthenticator.probe}), so that a flood of them does
    not make a PostgreSQL that answers look down.
    """

    name = "postgres"

    def __init__(
        self,
        authenticator: _Probed,
        clock: IReactorTime,
        timeout_seconds: float = 1.0,
        fresh_seconds: float = 1.0,
    ) -> None:
        self._authenticator = authenticator
        self._clock = clock
        self._timeout_seconds = timeout_seconds
        self._fresh_seconds = fresh_seconds
        self._last: tuple[float, DependencyState] | None = None
        self._waiting: list[Deferred[DependencyState]] | None = None

    def check(self) -> Deferred[DependencyState]:
        """The latest answer if fresh, else the answer of the (possibly shared) probe."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last[0] < self._fresh_seconds:
            return succeed(self._last[1])
        if not self._authenticator.connected:
            state = DependencyState(False, "disconnected", "no live connection (reconnecting)")
            return succeed(state)
        answer: Deferred[DependencyState] = Deferred()
        if self._waiting is None:
            self._waiting = [answer]
            self._probe()
        else:
            self._waiting.append(answer)
        return answer

    def _probe(self) -> None:
        query = self._authenticator.probe()
        # A reactor busy with a burst of requests may read an answer that came in time
        # only after the deadline has passed: it gets one more turn, which reads whatever
        # arrived, before the probe counts as unanswered.
        deadline = self._clock.callLater(
            self._timeout_seconds, self._clock.callLater, 0, _give_up, query
        )
        query.addBoth(_stop, deadline)
        states = query.addCallbacks(lambda _: DependencyState(True, "answering"), self._failed)
        states.addCallback(self._answered)

    def _failed(self, reason: Failure) -> DependencyState:
        if reason.check(CancelledError):
            return DependencyState(
                False, "not answering", f"no answer within {self._timeout_seconds} seconds"
            )
        if reason.check(BackendUnavailable):
            return DependencyState(False, "not answering", reason.getErrorMessage())
        return DependencyState(False, "error", reason.getErrorMessage())

    def _answered(self, state: DependencyState) -> None:
        self._last = (self._clock.seconds(), state)
        waiting, self._waiting = self._waiting or [], None
        for answer in waiting:
            answer.callback(state)


def _give_up(query: Deferred[bool]) -> None:
    if not query.called:
        query.cancel()


def _stop(result: object, deadline: IDelayedCall) -> object:
    if deadline.active():
        deadline.cancel()
    return result


def _no_store(request: Request, status: int, content_type: bytes) -> None:
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"cache-control", b"no-store")


class LivenessResource(Resource):
    """``200 ok``: the reactor runs and serves requests; nothing else is checked, so that a
    backend outage never gets a healthy process restarted."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        """Always ``ok``."""
        _no_store(request, 200, b"text/plain; charset=utf-8")
        return b"ok\n"


class ReadinessResource(Resource):
    """``200`` when every check is ready, else ``503``; the JSON body gives each state."""

    isLeaf = True
    log = Logger()

    def __init__(self, checks: Sequence[ReadinessCheck]) -> None:
        super().__init__()
        self._checks = checks

    def render_GET(self, request: Request) -> int:
        """Run the checks, then answer; a client that left gets nothing."""
        finished = request.notifyFinish()
        gone: list[bool] = []
        finished.addErrback(lambda _: gone.append(True))
        states = gatherResults([check.check() for check in self._checks])
        states.addCallback(self._answer, request, gone)
        states.addErrback(self._broken, request, gone)
        return NOT_DONE_YET

    def _broken(self, reason: Failure, request: Request, gone: list[bool]) -> None:
        self.log.failure("readiness check failed", reason)
        if not gone:
            _no_store(request, 503, b"application/json")
            request.write(json.dumps({"ready": False, "error": "check failed"}).encode() + b"\n")
            request.finish()

    def _answer(self, states: list[DependencyState], request: Request, gone: list[bool]) -> None:
        if gone:
            return
        ready = all(state.ready for state in states)
        body = {
            "ready": ready,
            "dependencies": {
                check.name: asdict(state) for check, state in zip(self._checks, states, strict=True)
            },
        }
        _no_store(request, 200 if ready else 503, b"application/json")
        request.write(json.dumps(body).encode("utf-8") + b"\n")
        request.finish()
