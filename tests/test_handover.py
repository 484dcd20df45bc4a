"""One instance restarted on its host refuses no connection when systemd holds the socket.

The test process plays the part of systemd's socket unit (deploy/systemd/sse-twisted.socket):
it owns the listening socket and starts each twistd with it, by the sd_listen_fds(3) protocol
(descriptor 3, LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID). A restart is what
``systemctl restart`` does: SIGTERM, wait for the process to end, start it again. Meanwhile
clients connect in a loop (TLS handshake, ``GET /healthz``) and every outcome is counted.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from sse_twisted._listener import FIRST_REQUEST_SECONDS, ListenerService
from tests.backends import Pki, free_port
from tests.browser import Browser
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.test_deploy_manifests import SERVICE_UNIT, unit_values
from tests.twistd_processes import TWISTD, TwistdProcess, spawn_twistd
from tests.waiting import TIMEOUT, bounded, wait_for

CLIENTS = 4
# Restarts each restart test makes; the README's figures are from
# HANDOVER_RESTARTS=20 .venv/bin/pytest -s -k restart tests/test_handover.py
RESTARTS = int(os.environ.get("HANDOVER_RESTARTS", "1"))


@dataclass(frozen=True)
class Attempt:
    """One client connection: when it started and ended (monotonic), and how it went."""

    started: float
    ended: float
    outcome: str


def _one_request(port: int, context: ssl.SSLContext) -> str:
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := tls.recv(4096):
                response += chunk
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except OSError as error:  # ssl.SSLError among them
        return f"failed: {error!r}"
    return "ok" if response.startswith(b"HTTP/1.1 200 ") else f"answered: {response[:40]!r}"


@contextmanager
def clients_connecting(port: int, ca: Path) -> Iterator[list[Attempt]]:
    """Clients connecting to ``port`` in a loop, each attempt recorded, until the block ends."""
    context = ssl.create_default_context(cafile=str(ca))
    attempts: list[Attempt] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            outcome = _one_request(port, context)
            attempts.append(Attempt(started, time.monotonic(), outcome))
            stop.wait(0.02)

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    try:
        yield attempts
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)


def served_since(attempts: list[Attempt], moment: float) -> int:
    return sum(1 for attempt in attempts if attempt.started > moment and attempt.outcome == "ok")


@dataclass
class Restart:
    """What the clients saw across one restart, and the window with no server process."""

    attempts: list[Attempt]
    stopped: float
    ready: float

    def outcomes(self) -> Counter[str]:
        return Counter(attempt.outcome for attempt in self.attempts)

    def started_while_down(self) -> list[Attempt]:
        return [a for a in self.attempts if self.stopped <= a.started <= self.ready]


async def _start(
    environ: dict[str, str], cwd: Path, listening_socket: socket.socket | None
) -> TwistdProcess:
    process, _transport = spawn_twistd(environ, cwd, listening_socket=listening_socket)
    await bounded(process.consuming)
    return process


async def restart_under_load(
    environ: dict[str, str],
    tmp_path: Path,
    pki: Pki,
    port: int,
    listening_socket: socket.socket | None = None,
) -> Restart:
    """Start a server, restart it while clients connect in a loop; a stream open before
    the restart must resume after it with its Last-Event-ID and miss nothing."""
    queue = environ["SSE_RABBITMQ_QUEUE_NAME"]
    userid, token = add_local_subscriber(environ["SSE_POSTGRES_DB_NAME"])
    url = f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}"
    browser = Browser(pki.ca_certificate)
    old = await _start(environ, tmp_path, listening_socket)
    new: TwistdProcess | None = None
    try:
        _, stream = await browser.open(url)
        await publish(5672, queue, found_contract(userid, filename="before"))
        seen = await stream.next_event()
        with clients_connecting(port, pki.ca_certificate) as attempts:
            began = time.monotonic()
            await wait_for(lambda: served_since(attempts, began) >= CLIENTS, "served before")
            stopped = time.monotonic()
            await old.terminate(TIMEOUT)
            await bounded(stream.closed)
            await publish(5672, queue, found_contract(userid, filename="while restarting"))
            new = await _start(environ, tmp_path, listening_socket)
            ready = time.monotonic()
            await wait_for(lambda: served_since(attempts, ready) >= CLIENTS, "served after")
        _, resumed = await browser.open(url, last_event_id=seen["id"])
        missed = await resumed.next_event()
        assert json.loads(missed["data"])["filename"] == "while restarting"
        assert int(missed["id"]) > int(seen["id"])
        return Restart(list(attempts), stopped, ready)
    finally:
        await browser.close_all()
        for process in (old, new) if new else (old,):
            if not process.ended.called:
                await process.terminate(TIMEOUT)


async def restarts_under_load(
    environ: dict[str, str],
    tmp_path: Path,
    pki: Pki,
    port: int,
    listening_socket: socket.socket | None = None,
) -> list[Restart]:
    """L{restart_under_load} C{RESTARTS} times; a summary of what the clients saw is printed."""
    restarts = [
        await restart_under_load(environ, tmp_path, pki, port, listening_socket)
        for _ in range(RESTARTS)
    ]
    downtimes = sorted(restart.ready - restart.stopped for restart in restarts)
    waits = [a.ended - a.started for r in restarts for a in r.started_while_down()]
    print(
        f"\n{len(restarts)} restarts: {dict(outcomes(restarts))}; SIGTERM to ready: median "
        f"{downtimes[len(downtimes) // 2]:.2f} s, longest {downtimes[-1]:.2f} s; longest "
        f"connection begun meanwhile: {max(waits, default=0):.2f} s"
    )
    return restarts


def outcomes(restarts: list[Restart]) -> Counter[str]:
    """How every connection of every restart went, counted."""
    return sum((restart.outcomes() for restart in restarts), Counter[str]())


@pytest.fixture
def systemd_socket() -> Iterator[socket.socket]:
    """A listening socket owned by the test, as the socket unit's is owned by systemd."""
    listening = socket.create_server(("127.0.0.1", 0), backlog=4096)
    with listening:
        yield listening


@pytest_twisted.ensureDeferred
async def test_a_restart_with_the_socket_held_by_systemd_refuses_and_resets_no_connection(
    plaintext_environ: dict[str, str], tmp_path: Path, pki: Pki, systemd_socket: socket.socket
) -> None:
    environ = {**plaintext_environ, "SSE_LISTEN_SOCKET": "systemd", "SSE_DRAIN_SECONDS": "1"}
    port = systemd_socket.getsockname()[1]
    restarts = await restarts_under_load(environ, tmp_path, pki, port, systemd_socket)
    # Connections made while no process ran waited in the socket's queue, then were served.
    for restart in restarts:
        assert restart.started_while_down(), "no client connected while the server was down"
    assert set(outcomes(restarts)) == {"ok"}
    # The server set SSE_TCP_USER_TIMEOUT_SECONDS (45) on the socket it was given, which
    # its accepted connections inherit; the test made it without.
    timeout = systemd_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert timeout == 45_000


@pytest_twisted.ensureDeferred
async def test_a_restart_of_a_server_that_binds_its_port_refuses_connections(
    plaintext_environ: dict[str, str], tmp_path: Path, pki: Pki
) -> None:
    port = free_port()
    environ = {**plaintext_environ, "SSE_PORT": str(port), "SSE_DRAIN_SECONDS": "1"}
    restarts = await restarts_under_load(environ, tmp_path, pki, port)
    assert outcomes(restarts)["refused"] > 0


@pytest_twisted.ensureDeferred
async def test_the_server_serves_on_the_socket_systemd_socket_activate_passes(
    plaintext_environ: dict[str, str], tmp_path: Path, pki: Pki
) -> None:
    """The real implementation of the protocol (not the test's), running the service unit's
    command: it execs the server on the first connection, which waits in the queue meanwhile
    and is then served."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    port = free_port()
    settings = [f"--setenv={name}={value}" for name, value in plaintext_environ.items()]
    # The command line of deploy/systemd/sse-twisted.service, with this checkout's twistd.
    (exec_start,) = unit_values(SERVICE_UNIT, "Service", "ExecStart")
    arguments = exec_start.split()[1:]
    process = TwistdProcess()
    reactor.spawnProcess(  # type: ignore[attr-defined]
        process,
        activate,
        [
            activate,
            f"--listen=127.0.0.1:{port}",
            "--fdname=https",
            *settings,
            str(TWISTD),
            *arguments,
        ],
        env={},
        path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r"},
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_certificate))
        deadline = time.monotonic() + 20
        outcome = "refused"
        # systemd-socket-activate binds a moment after it starts: wait until it listens.
        while outcome == "refused" and time.monotonic() < deadline:
            outcome = await _in_thread(_one_request, port, context)
        assert outcome == "ok"
        assert await bounded(process.port) == port
    finally:
        await process.terminate(TIMEOUT)


async def _in_thread(function: Any, *arguments: Any) -> Any:
    return await bounded(deferToThread(function, *arguments))


def test_listening_on_systemd_s_socket_without_one_stops_start_up_with_one_line(
    plaintext_environ: dict[str, str], tmp_path: Path
) -> None:
    completed = subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "sse-server"],
        env={"PATH": "/usr/bin:/bin", **plaintext_environ, "SSE_LISTEN_SOCKET": "systemd"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        "sse-server: SSE_LISTEN_SOCKET=systemd, but no socket was passed to this process "
        "(LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES): start it through its socket unit, "
        "or use SSE_LISTEN_SOCKET=bind"
    )


class _Answer(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"answer to " + data)


def test_the_drain_answers_a_connection_accepted_just_before_it_then_closes_it() -> None:
    reactor = MemoryReactorClock()
    listener = ListenerService(
        TCP4ServerEndpoint(reactor, 0), Factory.forProtocol(_Answer), reactor
    )
    listener.startService()
    factory = reactor.tcpServers[0][1]
    address = IPv4Address("TCP", "127.0.0.1", 40000)
    talking, talking_transport = factory.buildProtocol(address), StringTransport()
    talking.makeConnection(talking_transport)
    talking.dataReceived(b"GET /a")
    fresh, fresh_transport = factory.buildProtocol(address), StringTransport()
    fresh.makeConnection(fresh_transport)

    listener.drain_connections()
    drained = ensureDeferred(listener.close_connections(10))
    assert talking_transport.disconnecting
    assert not fresh_transport.disconnecting

    fresh.dataReceived(b"GET /b")
    assert fresh_transport.value() == b"answer to GET /b"
    assert fresh_transport.disconnecting
    for protocol in (talking, fresh):
        protocol.connectionLost(Failure(ConnectionDone()))
    assert drained.called


def test_the_drain_closes_a_connection_still_silent_after_a_second() -> None:
    reactor = MemoryReactorClock()
    listener = ListenerService(
        TCP4ServerEndpoint(reactor, 0), Factory.forProtocol(_Answer), reactor
    )
    listener.startService()
    silent, transport = reactor.tcpServers[0][1].buildProtocol(None), StringTransport()
    silent.makeConnection(transport)

    listener.drain_connections()
    drained = ensureDeferred(listener.close_connections(10))
    reactor.advance(FIRST_REQUEST_SECONDS - 0.01)
    assert not transport.disconnecting
    reactor.advance(0.01)
    assert transport.disconnecting
    silent.connectionLost(Failure(ConnectionDone()))
    assert drained.called
