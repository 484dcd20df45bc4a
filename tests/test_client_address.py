"""The real client address behind trusted reverse proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.logger import LogEvent
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._client_address import client_address, forwarded_client
from tests.browser import Browser
from tests.in_process_server import start_server

PROXIES = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_headers() -> None:
    request = DummyRequest([])
    request.client = IPv4Address("TCP", "10.0.0.5", 4433)
    request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.9"])
    assert client_address(request, ()) == "10.0.0.5"


def test_a_trusted_proxy_is_believed_on_x_forwarded_for() -> None:
    request = DummyRequest([])
    request.client = IPv4Address("TCP", "10.0.0.5", 4433)
    request.requestHeaders.setRawHeaders(b"x-forwarded-for", [b"203.0.113.9"])
    assert client_address(request, PROXIES) == "203.0.113.9"


@pytest.mark.parametrize(
    ("peer", "x_forwarded_for", "forwarded", "client"),
    [
        # A peer that is not a trusted proxy may write anything.
        ("198.51.100.7", [b"203.0.113.9"], None, "198.51.100.7"),
        # The right-most untrusted hop: what the client wrote to the left is not believed.
        ("10.0.0.5", [b"1.2.3.4, 203.0.113.9"], None, "203.0.113.9"),
        ("10.0.0.5", [b"1.2.3.4, 203.0.113.9, 10.0.0.8"], None, "203.0.113.9"),
        # Repeated headers are one list, in order.
        ("10.0.0.5", [b"1.2.3.4", b"203.0.113.9"], None, "203.0.113.9"),
        # Ports and IPv6 forms.
        ("10.0.0.5", [b"203.0.113.9:5123"], None, "203.0.113.9"),
        ("10.0.0.5", [b"[2001:db8::1]:443"], None, "2001:db8::1"),
        ("fd00::1", [b"2001:db8::1"], None, "2001:db8::1"),
        # Every hop trusted: the left-most made the request.
        ("10.0.0.5", [b"10.0.0.7, 10.0.0.8"], None, "10.0.0.7"),
        # RFC 7239, used only when X-Forwarded-For is absent.
        ("10.0.0.5", None, [b'for=203.0.113.9;proto=https, for="10.0.0.8"'], "203.0.113.9"),
        ("10.0.0.5", None, [b'For="[2001:db8::1]:4711"'], "2001:db8::1"),
        ("10.0.0.5", [b"203.0.113.9"], [b"for=198.51.100.1"], "203.0.113.9"),
        # Unreadable headers fall back to the peer.
        ("10.0.0.5", [b"203.0.113.9, not-an-address"], None, "10.0.0.5"),
        ("10.0.0.5", [b""], None, "10.0.0.5"),
        ("10.0.0.5", None, [b"for=unknown"], "10.0.0.5"),
        ("10.0.0.5", None, [b"proto=https"], "10.0.0.5"),
        ("10.0.0.5", None, [b"for=_hidden"], "10.0.0.5"),
        ("10.0.0.5", [b"\xff\xfe"], None, "10.0.0.5"),
        # No header: the proxy itself.
        ("10.0.0.5", None, None, "10.0.0.5"),
    ],
)
def test_the_client_is_the_right_most_untrusted_forwarded_address(
    peer: str, x_forwarded_for: list[bytes] | None, forwarded: list[bytes] | None, client: str
) -> None:
    assert forwarded_client(peer, x_forwarded_for, forwarded, PROXIES) == client


@pytest.mark.parametrize(
    ("trusted_proxies", "client"), [("127.0.0.0/8", "203.0.113.9"), ("", "127.0.0.1")]
)
@pytest_twisted.ensureDeferred
async def test_the_access_log_names_the_forwarded_client_only_behind_a_trusted_proxy(
    plaintext_environ: dict[str, str],
    browser: Browser,
    log_events: Sequence[LogEvent],
    trusted_proxies: str,
    client: str,
) -> None:
    server = await start_server({**plaintext_environ, "SSE_TRUSTED_PROXIES": trusted_proxies})
    try:
        forwarded = {b"x-forwarded-for": [b"198.51.100.1, 203.0.113.9"]}
        response = await browser.get(f"{server.base_url}/subscribe/not-a-topic", forwarded)
        await browser.read_body(response)
    finally:
        await server.stop()
    access = [event for event in log_events if event["log_namespace"] == "sse_twisted.access"]
    assert [(event["status"], event["client"]) for event in access] == [(400, client)]
