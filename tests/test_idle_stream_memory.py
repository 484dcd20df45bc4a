"""An open event stream keeps only what it still uses of its request: the headers, query
arguments, cookies, body and split path are let go once the response has begun (about
2.1 KB of each idle stream, bench S1), and the stream goes on working without them."""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from tests.browser import Browser
from tests.in_process_server import start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.waiting import wait_for


@pytest.fixture
def plaintext_environ(plaintext_environ: dict[str, str]) -> dict[str, str]:
    """The local plaintext backends; logs to stdout only (an in-process server never closes
    its daily log file)."""
    return {name: value for name, value in plaintext_environ.items() if name != "SSE_LOGS_DIR"}


@pytest_twisted.ensureDeferred
async def test_an_open_stream_holds_no_request_headers_or_body_and_still_gets_its_events(
    plaintext_environ: dict[str, str], browser: Browser
) -> None:
    server = await start_server(plaintext_environ)
    try:
        userid, token = add_local_subscriber(plaintext_environ["SSE_POSTGRES_DB_NAME"])
        response, tab = await browser.open(
            server.subscribe_url(new_uuid(), userid, token) + "?tab=1"
        )
        assert response.headers.getRawHeaders(b"content-type") == [
            b"text/event-stream; charset=utf-8"
        ]
        registry = server.service.registry
        await wait_for(lambda: registry.count_of(userid) == 1, "stream not registered")
        [stream] = registry.streams_of(userid)
        request = stream.request
        assert list(request.requestHeaders.getAllRawHeaders()) == []
        assert list(request.responseHeaders.getAllRawHeaders()) == []
        assert (request.args, request.received_cookies, request.content) == ({}, {}, None)
        assert (request.prepath, request.postpath) == ([], [])

        await publish(
            server.config.rabbitmq_port, server.config.rabbitmq_queue_name, found_contract(userid)
        )
        event = await tab.next_event()
        assert json.loads(event["data"]) == found_contract(userid)
        tab.close()
        await wait_for(lambda: registry.count_of(userid) == 0, "stream not closed")
    finally:
        await browser.close_all()
        await server.stop()
