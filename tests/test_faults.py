"""Faults with real processes: the broker killed with SIGKILL while events flow, and a client
process frozen with SIGSTOP (a half-open connection: the kernel still ACKs, nothing reads)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.backends import Pki, PostgresServer, RabbitMQServer
from tests.browser import Browser, EventCollector
from tests.in_process_server import RunningServer, start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_subscriber
from tests.waiting import wait_for

OUTAGE_SECONDS = 8.0


@pytest.fixture
def tls_environ(tls_environ: dict[str, str]) -> dict[str, str]:
    """A heartbeat every 0.5 s, so an outage shows whether heartbeats go on."""
    return {**tls_environ, "SSE_HEARTBEAT_SECONDS": "0.5"}


def filenames(tab: EventCollector) -> list[str]:
    return [json.loads(event["data"])["filename"] for event in tab.received]


async def readiness(browser: Browser, server: RunningServer) -> tuple[int, dict[str, Any]]:
    response = await browser.get(f"{server.base_url}/readyz")
    return response.code, json.loads(await browser.read_body(response))


async def wait_for_readiness(browser: Browser, server: RunningServer, code: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        status, body = await readiness(browser, server)
        if status == code:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"/readyz never answered {code}: {body}")
        await deferLater(reactor, 0.2, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_broker_killed_with_sigkill_loses_no_event_and_open_streams_keep_beating(
    tls_environ: dict[str, str],
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
) -> None:
    server = await start_server(tls_environ)
    queue = server.config.rabbitmq_queue_name
    try:
        userid, token = add_subscriber(postgres_tls)
        _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
        before = [found_contract(userid, filename=f"before {n}") for n in range(20)]
        await publish(rabbitmq_tls.amqp_port, queue, *before)
        await wait_for(lambda: len(tab.received) == 20, "the events sent before the kill")
        assert (await readiness(browser, server))[0] == 200

        killed_at = time.monotonic()
        await deferToThread(rabbitmq_tls.kill)
        try:
            body = await wait_for_readiness(browser, server, 503)
            assert body["dependencies"]["rabbitmq"]["ready"] is False
            assert body["dependencies"]["postgres"]["ready"] is True
            # A producer that keeps trying through the outage: its messages go in once the
            # broker is back, and must reach the open stream like any other.
            during = [found_contract(userid, filename=f"during {n}") for n in range(20)]
            publishing = publish(
                rabbitmq_tls.amqp_port, queue, *during, broker_wait_seconds=OUTAGE_SECONDS + 60
            )
            beats = len(tab.parser.comments)
            await deferLater(reactor, OUTAGE_SECONDS, lambda: None)
            # Heartbeats every 0.5 s kept flowing on the open stream all along.
            assert len(tab.parser.comments) - beats >= OUTAGE_SECONDS
            assert not tab.closed.called
            assert not publishing.called
        finally:
            await deferToThread(rabbitmq_tls.restart)
        outage = time.monotonic() - killed_at
        await publishing
        after = [found_contract(userid, filename=f"after {n}") for n in range(20)]
        await publish(rabbitmq_tls.amqp_port, queue, *after)
        await wait_for(lambda: len(tab.received) >= 60, "the events sent after the restart", 60)
        await wait_for_readiness(browser, server, 200)
        assert not tab.closed.called
        assert filenames(tab) == [message["filename"] for message in before + during + after]
        print(f"broker SIGKILL: outage {outage:.1f}s, 60 events sent, {len(tab.received)} got")
    finally:
        await server.stop()


_FROZEN_CLIENT = """
import socket, ssl, sys
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
tls = ssl.create_default_context(cafile=sys.argv[2]).wrap_socket(raw, server_hostname="localhost")
tls.sendall(f"GET {sys.argv[3]} HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n".encode())
seen = b""
while b": connected" not in seen:
    chunk = tls.recv(4096)
    if not chunk:
        sys.exit(f"the server closed before ': connected': {seen[:300]!r}")
    seen += chunk
print("open", flush=True)
while tls.recv(4096):
    pass
"""


def _start_frozen_client(port: int, ca: Path, path: str) -> subprocess.Popen[str]:
    """A client process with a stream open, then frozen by SIGSTOP (its socket stays)."""
    client = subprocess.Popen(
        [sys.executable, "-c", _FROZEN_CLIENT, str(port), str(ca), path],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None and client.stdout.readline() == "open\n"
    client.send_signal(signal.SIGSTOP)
    return client


@pytest_twisted.ensureDeferred
async def test_a_frozen_client_process_is_dropped_within_seconds_and_the_registry_empties(
    tls_environ: dict[str, str],
    browser: Browser,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    pki: Pki,
) -> None:
    server = await start_server({**tls_environ, "SSE_MAX_BUFFER_BYTES": "262144"})
    queue = server.config.rabbitmq_queue_name
    client = None
    try:
        userid, token = add_subscriber(postgres_tls)
        topic = new_uuid()
        port = server.port
        client = await deferToThread(
            _start_frozen_client, port, pki.ca_certificate, f"/subscribe/{topic}/{userid}/{token}"
        )
        _, healthy = await browser.open(server.subscribe_url(topic, userid, token))
        await wait_for(lambda: len(server.service.registry) == 2, "both streams open")

        # The kernel's buffers (autotuned, up to megabytes) fill first, then the server's
        # own: publish 1 MB rounds until the frozen stream is dropped, at most 20.
        started = time.monotonic()
        padding = "x" * 20_000
        sent = 0
        while len(server.service.registry) == 2:
            assert sent < 1000, "the frozen stream was never dropped"
            batch = [
                found_contract(userid, filename=str(n), padding=padding)
                for n in range(sent, sent + 50)
            ]
            await publish(rabbitmq_tls.amqp_port, queue, *batch)
            sent += len(batch)
            await wait_for(lambda sent=sent: len(healthy.received) == sent, "the round on the tab")
            with contextlib.suppress(TimeoutError):
                await wait_for(lambda: len(server.service.registry) == 1, "the drop", 1.0)
        detected = time.monotonic() - started
        assert filenames(healthy) == [str(n) for n in range(sent)]
        assert server.service.registry.count_of(userid) == 1
        healthy.close()
        await wait_for(lambda: len(server.service.registry) == 0, "no stream left")
        print(f"frozen client dropped {detected:.1f}s, after {sent // 50} MB of events")
    finally:
        if client is not None:
            client.kill()
            client.wait()
            assert client.stdout is not None
            client.stdout.close()
        await server.stop()
