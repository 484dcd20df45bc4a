"""Responses name the software in ``Server`` without a version (Twisted's or ours): over
HTTP/1.1 and HTTP/2 on the public port, and on the metrics port."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import AsyncIterator

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from sse_twisted._metrics import Metrics, metrics_site
from tests.backends import Pki
from tests.browser import Browser
from tests.in_process_server import RunningServer, start_server


@pytest_twisted.async_yield_fixture
async def server(plaintext_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    running = await start_server(plaintext_environ)
    yield running
    await running.stop()


def _http2_headers(url: str, ca_file: str) -> list[str]:
    result = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", ca_file, "-o", "/dev/null", "-D", "-", url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.startswith("HTTP/2 200"), result.stdout
    return result.stdout.splitlines()


def _metrics_server_header(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        return response.headers.get_all("server") or []


@pytest_twisted.ensureDeferred
async def test_http11_responses_carry_a_server_header_without_a_version(
    server: RunningServer, browser: Browser
) -> None:
    for path in ("/healthz", "/no-such-page"):
        response = await browser.get(server.base_url + path)
        await browser.read_body(response)
        assert response.headers.getRawHeaders(b"server") == [b"sse-twisted"]


@pytest_twisted.ensureDeferred
async def test_http2_responses_carry_a_server_header_without_a_version(
    server: RunningServer, pki: Pki
) -> None:
    lines = await deferToThread(
        _http2_headers, server.base_url + "/healthz", str(pki.ca_certificate)
    )
    assert [line for line in lines if line.lower().startswith("server:")] == ["server: sse-twisted"]


@pytest_twisted.ensureDeferred
async def test_the_metrics_port_carries_a_server_header_without_a_version() -> None:
    port = reactor.listenTCP(0, metrics_site(Metrics(), reactor), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        assert await deferToThread(_metrics_server_header, port.getHost().port) == ["sse-twisted"]
    finally:
        await port.stopListening()
