"""``/healthz`` and ``/readyz``: unit tests with a fake clock, then the real backends going down."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._health import (
    ConsumerCheck,
    DependencyState,
    LivenessResource,
    PostgresCheck,
    ReadinessResource,
)
from sse_twisted.interfaces import BackendUnavailable
from tests.backends import PostgresServer, RabbitMQServer
from tests.browser import Browser
from tests.fakes import PendingAuthenticator
from tests.in_process_server import RunningServer, start_server
from tests.waiting import TIMEOUT


@dataclass
class FakeConsumer:
    consuming: bool
    behind: str | None = None


def _disconnected() -> PendingAuthenticator:
    """An authenticator whose pool has no live connection."""
    authenticator = PendingAuthenticator()
    authenticator.connected = False
    return authenticator


def state_of(check: PostgresCheck) -> DependencyState | None:
    answers: list[DependencyState] = []
    check.check().addCallback(answers.append)
    return answers[0] if answers else None


def test_a_disconnected_pool_is_not_ready_at_once_and_costs_no_query() -> None:
    authenticator = _disconnected()
    state = state_of(PostgresCheck(authenticator, Clock()))
    assert state == DependencyState(False, "disconnected", "no live connection (reconnecting)")
    assert authenticator.probes == []


def test_concurrent_probes_share_one_query_and_its_answer_stays_fresh_one_second() -> None:
    authenticator, clock = PendingAuthenticator(), Clock()
    check = PostgresCheck(authenticator, clock)
    first, second = [], []
    check.check().addCallback(first.append)
    check.check().addCallback(second.append)
    assert len(authenticator.probes) == 1
    authenticator.probes[0].callback(False)  # the probe pair is no subscriber: still an answer
    assert first == second == [DependencyState(True, "answering")]
    clock.advance(0.5)
    assert state_of(check) == DependencyState(True, "answering")
    assert len(authenticator.probes) == 1
    clock.advance(0.6)
    assert state_of(check) is None
    assert len(authenticator.probes) == 2


def test_a_query_without_answer_is_not_ready_after_the_probe_timeout() -> None:
    authenticator, clock = PendingAuthenticator(), Clock()
    answers: list[DependencyState] = []
    PostgresCheck(authenticator, clock, timeout_seconds=1.0).check().addCallback(answers.append)
    clock.advance(0.9)
    assert answers == []
    clock.advance(0.2)
    assert answers == [DependencyState(False, "not answering", "no answer within 1.0 seconds")]


def test_an_unavailable_backend_gives_its_reason() -> None:
    authenticator = PendingAuthenticator()
    answers: list[DependencyState] = []
    PostgresCheck(authenticator, Clock()).check().addCallback(answers.append)
    authenticator.probes[0].errback(BackendUnavailable('relation "users" does not exist'))
    assert answers == [DependencyState(False, "not answering", 'relation "users" does not exist')]


def test_readiness_is_200_only_when_every_dependency_is_ready() -> None:
    consumer = FakeConsumer(consuming=True)
    checks = [
        ConsumerCheck(consumer, "messages"),
        PostgresCheck(_disconnected(), Clock()),
    ]
    resource = ReadinessResource(checks)
    request = DummyRequest([b""])
    assert resource.render(request) == NOT_DONE_YET
    assert request.responseCode == 503
    assert json.loads(b"".join(request.written)) == {
        "ready": False,
        "dependencies": {
            "rabbitmq": {"ready": True, "state": "consuming", "reason": None},
            "postgres": {
                "ready": False,
                "state": "disconnected",
                "reason": "no live connection (reconnecting)",
            },
        },
    }
    ready = ReadinessResource([ConsumerCheck(consumer, "messages")])
    request = DummyRequest([b""])
    ready.render(request)
    assert request.responseCode == 200
    assert json.loads(b"".join(request.written))["ready"] is True


def test_a_client_gone_before_the_answer_gets_nothing_written() -> None:
    authenticator = PendingAuthenticator()
    resource = ReadinessResource([PostgresCheck(authenticator, Clock())])
    request = DummyRequest([b""])
    resource.render(request)
    # How DummyRequest reports a lost connection to notifyFinish() observers.
    request.processingFailed(Failure(ConnectionDone("gone")))
    authenticator.probes[0].callback(False)
    assert request.written == []
    assert request.finished == 0


def test_liveness_is_a_plain_ok() -> None:
    request = DummyRequest([b""])
    assert LivenessResource().render(request) == b"ok\n"
    assert request.responseCode in (None, 200)


# ---------------------------------------------------------------- real backends


@pytest_twisted.async_yield_fixture
async def server(tls_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    running = await start_server(tls_environ)
    yield running
    await running.stop()


async def fetch(browser: Browser, url: str) -> tuple[int, bytes]:
    response = await browser.get(url)
    return response.code, await browser.read_body(response)


async def readiness_until(browser: Browser, server: RunningServer, status: int) -> dict[str, Any]:
    """Ask /readyz, as a load balancer does, until it answers ``status``; return the body."""
    deadline = reactor.seconds() + 2 * TIMEOUT
    while True:
        code, body = await fetch(browser, server.base_url + "/readyz")
        if code == status:
            return json.loads(body)  # type: ignore[no-any-return]
        if reactor.seconds() > deadline:
            raise AssertionError(f"/readyz still answers {code}: {body!r}")
        await deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_healthz_answers_ok_on_the_public_tls_port(
    server: RunningServer, browser: Browser
) -> None:
    assert await fetch(browser, server.base_url + "/healthz") == (200, b"ok\n")


@pytest_twisted.ensureDeferred
async def test_readyz_is_200_with_both_backends_up(server: RunningServer, browser: Browser) -> None:
    body = await readiness_until(browser, server, 200)
    assert body["ready"] is True
    assert body["dependencies"]["rabbitmq"]["state"] == "consuming"
    assert body["dependencies"]["postgres"]["state"] == "answering"


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_naming_postgres_while_it_is_down(
    server: RunningServer, browser: Browser, postgres_tls: PostgresServer
) -> None:
    await readiness_until(browser, server, 200)
    await deferToThread(postgres_tls.stop)
    try:
        body = await readiness_until(browser, server, 503)
        assert body["dependencies"]["postgres"]["ready"] is False
        assert body["dependencies"]["postgres"]["reason"]
        assert body["dependencies"]["rabbitmq"]["ready"] is True
        # Liveness does not follow a backend: restarting this process would not help.
        assert (await fetch(browser, server.base_url + "/healthz"))[0] == 200
    finally:
        await deferToThread(postgres_tls.start)
    await readiness_until(browser, server, 200)


@pytest_twisted.ensureDeferred
async def test_readyz_is_503_naming_rabbitmq_while_it_is_down(
    server: RunningServer, browser: Browser, rabbitmq_tls: RabbitMQServer
) -> None:
    await readiness_until(browser, server, 200)
    await deferToThread(rabbitmq_tls.stop_app)
    try:
        body = await readiness_until(browser, server, 503)
        assert body["dependencies"]["rabbitmq"] == {
            "ready": False,
            "state": "not consuming",
            "reason": f"not consuming {server.config.rabbitmq_queue_name}: reconnecting",
        }
        assert body["dependencies"]["postgres"]["ready"] is True
    finally:
        await deferToThread(rabbitmq_tls.start_app)
    await readiness_until(browser, server, 200)
