"""In-memory test doubles that tests import instead of writing their own: authenticators,
each a full L{IAuthenticator} (checked with ``verifyObject`` in tests/test_fakes.py), and a
request and a subscribe resource built on fake clocks."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from sse_twisted._config import load_config
from sse_twisted._consumer import StreamConsumerService
from sse_twisted._live import LiveStart
from sse_twisted._metrics import Metrics
from sse_twisted._replay import ReplayWindow
from sse_twisted._shard import LocalPartition, LocalPartitions
from sse_twisted._streams import StreamRegistry
from sse_twisted._subscribe import SubscribeResource
from sse_twisted.interfaces import IAuthenticator

__all__ = [
    "ImmediateAuthenticator",
    "PendingAuthenticator",
    "ScriptedAuthenticator",
    "StreamingRequest",
    "make_resource",
    "render",
    "request_for",
]

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


def make_resource(
    authenticator: IAuthenticator, metrics: Metrics | None = None, **settings: Any
) -> tuple[SubscribeResource, StreamRegistry]:
    """A subscribe resource on in-memory parts (fake clocks, an empty stream read back);
    ``settings`` are L{Config} fields other than these defaults."""
    registry = StreamRegistry()
    window = ReplayWindow(Clock(), 60, 100)
    live = LiveStart(registry, window, Clock(), future_id_grace_seconds=3)
    live.tail_known(-1)  # an empty stream, read back
    config = replace(
        # The resource reads no certificate: any directory will do.
        load_config({"SSE_CERTS_DIR": str(Path(__file__).parent)}),
        **{
            "retry_milliseconds": 2000,
            "reconnect_jitter_milliseconds": 0,
            "max_buffer_bytes": 1000,
            "max_stream_seconds": math.inf,
            **settings,
        },
    )
    # One partition, as in an unpartitioned server; its consumer is never started.
    consumer = StreamConsumerService(
        replace(config, rabbitmq_tls=False),
        MemoryReactorClock(),
        on_message=lambda body, offset: 0,
        on_fatal=print,
        metrics=Metrics(),
    )
    partitions = LocalPartitions(1, [LocalPartition(0, window, live, consumer)])
    resource = SubscribeResource(
        config, registry, authenticator, Clock(), partitions, metrics or Metrics()
    )
    return resource, registry


def window_of(resource: SubscribeResource) -> ReplayWindow:
    """The replay window of a resource made by L{make_resource} (its only partition's)."""
    (partition,) = resource._partitions
    return partition.window


class StreamingRequest(DummyRequest):
    """DummyRequest drives any producer as a pull producer; streams are push producers.
    It also lacks what the access log line reads of a real Request: path, code, sentLength."""

    producer = None
    path = b""
    sentLength = 0

    @property
    def code(self) -> int:
        return self.responseCode or 200

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def request_for(path: str, method: bytes = b"GET", client: str = "192.0.2.1") -> DummyRequest:
    """A request for ``path`` from ``client``, as the site hands it to the resource."""
    request = StreamingRequest([part.encode() for part in path.lstrip("/").split("/")[1:]])
    request.path = path.encode()
    request.method = method
    request.client = IPv4Address("TCP", client, 50000)
    return request


def render(resource: SubscribeResource, request: DummyRequest) -> bytes:
    """What the resource wrote of its answer so far."""
    result = resource.render(cast(Request, request))  # DummyRequest stands in for it
    if isinstance(result, bytes):
        return result
    return b"".join(request.written)
