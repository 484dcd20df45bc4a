"""The browser experience in a real browser: headless Chromium (Debian's package, driven by
Playwright) opens ``EventSource`` streams on the server over TLS.

Chromium trusts the test server by the SHA-256 of its public key
(``--ignore-certificate-errors-spki-list``); nothing is downloaded. Playwright's sync API
runs on one thread of its own, so the test reactor keeps serving while the page waits.
The page is the server's own origin (``/healthz``), so the streams are same-origin.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from sse_twisted.devcerts import DevCertificateFiles
from tests.backends import Pki, PostgresServer
from tests.in_process_server import RunningServer, start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber, add_subscriber
from tests.test_drain import http2_until_closed, signal_from_thread
from tests.waiting import bounded, wait_for

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]

# Installed on the page: each named stream records its events, opens and errors.
_PAGE_SCRIPT = """
window.sse = {};
window.openStream = (name, url) => {
  const record = {events: [], opens: 0, errors: 0, closed: false};
  const source = new EventSource(url);
  source.onopen = () => { record.opens += 1; };
  source.onmessage = (event) => record.events.push({id: event.lastEventId, data: event.data});
  source.onerror = () => {
    record.errors += 1;
    record.closed = source.readyState === EventSource.CLOSED;
  };
  record.source = source;
  window.sse[name] = record;
};
window.state = (name) => {
  const {events, opens, errors, closed, source} = window.sse[name];
  return {events, opens, errors, closed, readyState: source.readyState};
};
// Playwright calls a script whose value is a function: end with something else.
null;
"""


def chromium_executable() -> str | None:
    """Debian's Chromium, if installed (``.ci/run`` installs it)."""
    for candidate in (
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def spki_hash(certificate_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)): what ``--ignore-certificate-errors-spki-list``
    matches."""
    certificate = x509.load_pem_x509_certificate(certificate_pem)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


class Chromium:
    """One headless Chromium, driven from a single thread of its own."""

    def __init__(self, executable: str, trusted_spki: str) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chromium")
        self._playwright: Any = None
        self._browser: Any = None
        self._thread.submit(self._launch, executable, trusted_spki).result(timeout=60)

    def _launch(self, executable: str, trusted_spki: str) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=executable,
            headless=True,
            args=[*CHROMIUM_FLAGS, f"--ignore-certificate-errors-spki-list={trusted_spki}"],
        )

    def call(self, function: Callable[..., Any], *arguments: Any) -> Deferred[Any]:
        """Run ``function(*arguments)`` on the browser's thread; fire with its result."""
        done: Deferred[Any] = Deferred()

        def report(future: Future[Any]) -> None:
            error = future.exception()
            if error is not None:
                reactor.callFromThread(done.errback, error)
            else:
                reactor.callFromThread(done.callback, future.result())

        self._thread.submit(function, *arguments).add_done_callback(report)
        return bounded(done, 90)

    def new_page(self, url: str) -> Deferred[Any]:
        """A new page (its own context) at ``url``, with the stream helpers installed."""

        def open_page() -> Any:
            page = self._browser.new_context().new_page()
            response = page.goto(url)
            assert response is not None and response.ok, f"cannot load {url}"
            page.evaluate(_PAGE_SCRIPT)
            return page

        return self.call(open_page)

    def evaluate(self, page: Any, script: str, *arguments: Any) -> Deferred[Any]:
        """``page.evaluate(script, arguments)`` on the browser's thread."""
        return self.call(page.evaluate, script, list(arguments) if arguments else None)

    def wait_until(self, page: Any, predicate: str, argument: Any = None) -> Deferred[Any]:
        """Wait (on the browser's thread) until the page function ``predicate`` is true."""
        return self.call(
            lambda: page.wait_for_function(predicate, arg=argument, timeout=30_000, polling=50)
        )

    def close_page(self, page: Any) -> Deferred[Any]:
        return self.call(page.context.close)

    def quit(self) -> None:
        def stop() -> None:
            self._browser.close()
            self._playwright.stop()

        self._thread.submit(stop).result(timeout=60)
        self._thread.shutdown()


@pytest.fixture(scope="session")
def chromium(pki: Pki) -> Iterator[Chromium]:
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run does it)")
    certificate = (pki.directory / DevCertificateFiles.browser_certificate).read_bytes()
    browser = Chromium(executable, spki_hash(certificate))
    yield browser
    browser.quit()


@pytest_twisted.async_yield_fixture
async def page_of(chromium: Chromium) -> AsyncIterator[Callable[[RunningServer], Any]]:
    """Open a page on a server's origin; every page is closed at the end."""
    pages: list[Any] = []

    async def open_on(server: RunningServer) -> Any:
        page = await chromium.new_page(server.base_url + "/healthz")
        pages.append(page)
        return page

    yield open_on
    for page in pages:
        await chromium.close_page(page)


def browser_environ(environ: dict[str, str]) -> dict[str, str]:
    """Quick reconnects, so that the tests do not wait for browsers' default delays; logs
    to stdout only (an in-process server never closes its daily log file)."""
    environ = {name: value for name, value in environ.items() if name != "SSE_LOGS_DIR"}
    return {
        **environ,
        "SSE_RETRY_MILLISECONDS": "300",
        "SSE_RECONNECT_JITTER_MILLISECONDS": "0",
        "SSE_DRAIN_SECONDS": "2",
    }


def _events(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(event["data"]) for event in state["events"]]


@pytest_twisted.ensureDeferred
async def test_an_event_published_to_rabbitmq_reaches_the_pages_onmessage_as_exact_json(
    plaintext_environ: dict[str, str], chromium: Chromium, page_of: Any
) -> None:
    environ = browser_environ(plaintext_environ)
    server = await start_server(environ)
    try:
        page = await page_of(server)
        userid, token = add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"])
        url = server.subscribe_url(new_uuid(), userid, token)
        await chromium.evaluate(page, "([url]) => openStream('a', url)", url)
        await chromium.wait_until(page, "() => window.sse.a.opens === 1")
        message = found_contract(userid, note="unicode ✓ \r\n data: id: no injection")
        await publish(5672, server.config.rabbitmq_queue_name, message)
        await chromium.wait_until(page, "() => window.sse.a.events.length >= 1")
        state = await chromium.evaluate(page, "() => state('a')")
        assert _events(state) == [message]
        assert state["events"][0]["data"] == json.dumps(message, separators=(",", ":"))
        assert state["events"][0]["id"].isdigit()
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_after_a_server_restart_the_page_reconnects_and_replays_the_gap_in_order_once(
    plaintext_environ: dict[str, str], chromium: Chromium, page_of: Any
) -> None:
    environ = browser_environ(plaintext_environ)
    server = await start_server(environ)
    port = str(server.port)
    page = await page_of(server)
    userid, token = add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"])
    url = server.subscribe_url(new_uuid(), userid, token)
    queue = server.config.rabbitmq_queue_name
    await chromium.evaluate(page, "([url]) => openStream('a', url)", url)
    await chromium.wait_until(page, "() => window.sse.a.opens === 1")
    await publish(5672, queue, found_contract(userid, n=1))
    await chromium.wait_until(page, "() => window.sse.a.events.length === 1")
    await server.stop()
    # While no server listens, the page keeps trying (a network error is not the end).
    await publish(5672, queue, *(found_contract(userid, n=n) for n in (2, 3, 4)))
    await chromium.wait_until(page, "() => window.sse.a.errors >= 1")
    assert (await chromium.evaluate(page, "() => state('a')"))["readyState"] == 0
    restarted = await start_server({**environ, "SSE_PORT": port})
    try:
        await chromium.wait_until(page, "() => window.sse.a.opens === 2")
        await publish(5672, queue, found_contract(userid, n=5))
        await chromium.wait_until(page, "() => window.sse.a.events.length >= 5")
        state = await chromium.evaluate(page, "() => state('a')")
        assert [event["n"] for event in _events(state)] == [1, 2, 3, 4, 5]
        ids = [int(event["id"]) for event in state["events"]]
        assert ids == sorted(set(ids))
    finally:
        await restarted.stop()


@pytest_twisted.ensureDeferred
async def test_bad_credentials_close_the_eventsource_but_a_database_outage_does_not(
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    chromium: Chromium,
    page_of: Any,
) -> None:
    environ = browser_environ(tls_environ)
    server = await start_server(environ)
    try:
        page = await page_of(server)
        userid, token = add_subscriber(postgres_tls)
        await chromium.evaluate(
            page,
            "([url]) => openStream('bad', url)",
            server.subscribe_url(new_uuid(), userid, new_uuid()),
        )
        await chromium.wait_until(page, "() => window.sse.bad.closed")
        bad = await chromium.evaluate(page, "() => state('bad')")
        assert (bad["readyState"], bad["opens"]) == (2, 0)

        await deferToThread(postgres_tls.stop)
        try:
            await chromium.evaluate(
                page,
                "([url]) => openStream('outage', url)",
                server.subscribe_url(new_uuid(), userid, token),
            )
            # Each attempt is a 200 that ends at once, with a retry hint: the browser retries.
            await chromium.wait_until(page, "() => window.sse.outage.errors >= 2")
            outage = await chromium.evaluate(page, "() => state('outage')")
            assert outage["readyState"] != 2 and not outage["closed"]
        finally:
            await deferToThread(postgres_tls.start)
        await wait_for(lambda: len(server.service.registry) == 1, "the stream never opened")
        await chromium.wait_until(page, "() => window.sse.outage.source.readyState === 1")
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_one_page_holds_twenty_streams_over_http2_all_receiving(
    plaintext_environ: dict[str, str], chromium: Chromium, page_of: Any
) -> None:
    environ = browser_environ(plaintext_environ)
    server = await start_server(environ)
    try:
        page = await page_of(server)
        userid, token = add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"])
        topic = new_uuid()
        # One user's limit is 16 streams by default: 20 streams of 20 users on one topic.
        users = [add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"]) for _ in range(20)]
        for index, (userid, token) in enumerate(users):
            await chromium.evaluate(
                page,
                "([name, url]) => openStream(name, url)",
                f"s{index}",
                server.subscribe_url(topic, userid, token),
            )
        await chromium.wait_until(
            page, "() => Object.values(window.sse).every((s) => s.opens === 1)"
        )
        streams = list(server.service.registry)
        assert len(streams) == 20
        # Over HTTP/1.1 Chromium would hold at most six connections to one origin.
        assert {stream.request.clientproto for stream in streams} == {b"HTTP/2"}
        await publish(
            5672,
            server.config.rabbitmq_queue_name,
            *(found_contract(userid, topic=topic) for userid, _ in users),
        )
        await chromium.wait_until(
            page, "() => Object.values(window.sse).every((s) => s.events.length === 1)"
        )
        for index, (userid, _) in enumerate(users):
            state = await chromium.evaluate(page, f"() => state('s{index}')")
            assert [event["userid"] for event in _events(state)] == [userid]
    finally:
        await server.stop()


@pytest_twisted.ensureDeferred
async def test_on_stop_the_page_is_told_to_come_back_and_the_draining_server_opens_it_no_stream(
    plaintext_environ: dict[str, str], chromium: Chromium, page_of: Any, pki: Pki
) -> None:
    environ = {**browser_environ(plaintext_environ), "SSE_DRAIN_SECONDS": "6"}
    server = await start_server(environ)
    database = environ["SSE_POSTGRES_DB_NAME"]
    (userid, token), (stuck_userid, stuck_token) = (add_local_subscriber(database) for _ in "ab")
    page = await page_of(server)
    # A client that gives the server no flow-control window holds the drain open, so that
    # the page comes back while the server is still draining.
    stuck_opened: Deferred[None] = Deferred()
    stuck = deferToThread(
        http2_until_closed,
        server.port,
        pki.ca_certificate,
        f"/subscribe/{new_uuid()}/{stuck_userid}/{stuck_token}",
        signal_from_thread(stuck_opened),
        0,
    )
    await bounded(stuck_opened)
    url = server.subscribe_url(new_uuid(), userid, token)
    await chromium.evaluate(page, "([url]) => openStream('a', url)", url)
    await chromium.wait_until(page, "() => window.sse.a.opens === 1")
    assert {stream.request.clientproto for stream in server.service.registry} == {b"HTTP/2"}
    stopping = Deferred.fromCoroutine(server.stop())
    # The stream ends with its retry:; 300 ms later the page comes back, on a new
    # connection (its own got GOAWAY), which nothing accepts: it keeps trying.
    await chromium.wait_until(page, "() => window.sse.a.errors >= 2")
    state = await chromium.evaluate(page, "() => state('a')")
    assert (state["opens"], state["readyState"]) == (1, 0)
    assert not stopping.called, "the drain ended before the page came back"
    await bounded(stopping)
    assert (await bounded(stuck)).closed


@pytest.fixture
def tls_environ(tls_environ: dict[str, str]) -> dict[str, str]:
    """A short database timeout: the outage test waits for the retry answers."""
    return {**tls_environ, "SSE_POSTGRES_TIMEOUT_SECONDS": "1"}
