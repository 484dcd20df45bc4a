"""Real proxies and real EventSource clients for the tests that run the shipped proxy
configurations (tests/test_proxies.py, tests/test_fleet.py): a shipped file rendered with
only addresses and paths changed, the proxy run in the foreground, HAProxy's stats socket
asked, and browsers played by the npm ``eventsource`` package on Node."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from tests.secrets_tracking import LOGGED_TEXT
from tests.waiting import TIMEOUT, bounded, wait_for

DEPLOY = Path(__file__).parent.parent / "deploy"
# The clients connect from this loopback address; the proxies reach the instances from
# 127.0.0.1, the one trusted proxy address.
CLIENT_ADDRESS = "127.0.0.2"
# .ci/run installs both proxies and node, and sets this: there a missing binary is a failure.
REQUIRED = os.environ.get("SSE_TEST_PROXIES_REQUIRED") == "1"
EVENTSOURCE_CLIENT = Path(__file__).parent / "eventsource_client"


def binary(name: str) -> str:
    """The proxy's executable; skipped with the reason outside CI, a failure in CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if found is None:
        reason = f"{name} is not installed (apt-get install nginx haproxy; .ci/run does)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def render(shipped: Path, replacements: Mapping[str, str]) -> str:
    """The shipped file with ``replacements`` made, each of which must apply: the test runs
    the file operators copy, with only addresses and paths changed."""
    text = shipped.read_text()
    for old, new in replacements.items():
        assert old in text, f"{shipped} no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    return text


class ProxyProcess(ProcessProtocol):
    """A proxy running in the foreground; its output is kept (and audited for secrets)."""

    def __init__(self) -> None:
        self.output = ""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data.decode("utf-8", "replace")

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        LOGGED_TEXT.append(self.output)
        self.ended.callback(None)


@dataclass
class Proxy:
    """A running proxy: where browsers reach it, its access log, what a retry looks like in
    it, and how to know it sends requests to an instance again."""

    port: int
    process: ProxyProcess
    transport: Any
    access_log: Callable[[], str]
    retried: re.Pattern[str]
    sees_up: Callable[[str], Deferred[None] | None]

    async def stop(self) -> None:
        if not self.process.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        await bounded(self.process.ended)


def spawn(argv: list[str], cwd: Path) -> tuple[ProxyProcess, Any]:
    """Run a proxy's command line in the foreground, with only PATH in its environment."""
    process = ProxyProcess()
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        process, argv[0], argv, env={"PATH": os.environ["PATH"]}, path=str(cwd)
    )
    return process, transport


async def listening(port: int, process: ProxyProcess) -> None:
    """Until the proxy accepts connections on ``port``; fails at once if it exited."""

    def accepts() -> bool:
        if process.ended.called:
            raise AssertionError(f"the proxy exited:\n{process.output}")
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    await wait_for(accepts, "the proxy never listened")


def haproxy_command(stats_socket: Path, command: str) -> str:
    """The answer of HAProxy's runtime API on ``stats_socket`` to ``command`` (blocking)."""
    with socket.socket(socket.AF_UNIX) as connection:
        connection.settimeout(5)
        connection.connect(str(stats_socket))
        connection.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer.decode()


def haproxy_server_state(stats_socket: Path, backend: str, server: str) -> tuple[str, str]:
    """``(status, check_status)`` of ``backend/server`` from ``show stat``."""
    answer = haproxy_command(stats_socket, "show stat")
    for row in csv.DictReader(io.StringIO(answer.removeprefix("# "))):
        if row["pxname"] == backend and row["svname"] == server:
            return row["status"], row["check_status"]
    raise AssertionError(f"no server {backend}/{server} in show stat:\n{answer}")


async def until_haproxy_checked(
    stats_socket: Path, backend: str, server: str, seconds: float = TIMEOUT
) -> None:
    """Until HAProxy holds ``backend/server`` UP with its last health check passed: a
    server that failed one check is "UP 1/2" and one that failed two is DOWN until two
    pass."""
    deadline = reactor.seconds() + seconds
    while True:
        state = await deferToThread(haproxy_server_state, stats_socket, backend, server)
        if state == ("UP", "L7OK"):
            return
        if reactor.seconds() > deadline:
            raise TimeoutError(f"HAProxy holds {backend}/{server} {state}")
        await deferLater(reactor, 0.1, lambda: None)


def installed_node() -> str:
    """The node executable, once tests/eventsource_client has its pinned packages (the npm
    ``eventsource``) installed by ``npm ci``; skipped with the reason outside CI, a failure
    in CI."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node (>= 20) and npm are not installed: the npm eventsource client needs them"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=EVENTSOURCE_CLIENT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if installed.returncode != 0:
        pytest.fail(f"npm ci in {EVENTSOURCE_CLIENT} failed:\n{installed.stdout}{installed.stderr}")
    return node


class EventSourceTab:
    """What one EventSource of the npm ``eventsource`` package saw: each opened stream,
    each event, each error. The library reconnects by itself with Last-Event-ID and gives
    up for good on a non-200."""

    def __init__(self) -> None:
        self.opens = 0
        # Whether a stream is open now.
        self.streaming = False
        self.events: list[dict[str, str]] = []
        self.errors: list[dict[str, Any]] = []
        # The node process running it ended.
        self.process_ended = False

    def happened(self, line: Mapping[str, Any]) -> None:
        """Take one line the client printed."""
        if line["type"] == "open":
            self.opens += 1
            self.streaming = True
        elif line["type"] == "error":
            self.errors.append(dict(line))
            self.streaming = False
        else:
            self.events.append({"event": line["type"], "id": line["id"], "data": line["data"]})

    @property
    def refused(self) -> list[dict[str, Any]]:
        """Answers other than a 200 event stream: the library closes for good on each."""
        return [error for error in self.errors if error["code"] is not None]

    @property
    def failures(self) -> list[dict[str, Any]]:
        """Streams cut rather than ended, and requests that got no response at all."""
        return [error for error in self.errors if error["message"] is not None]

    @property
    def gave_up(self) -> bool:
        """Closed for good (``readyState`` CLOSED) or its process ended."""
        return any(error["readyState"] == 2 for error in self.errors) or self.process_ended

    @property
    def requests(self) -> int:
        """Requests that got an answer: each opened stream and each refusal."""
        return self.opens + len(self.refused)


class EventSourceClients(ProcessProtocol):
    """Several EventSources (one per URL, each a L{EventSourceTab}) in one node process
    (tests/eventsource_client/client.mjs), as the tabs of browsers: each prints a line
    for each thing that happens, tagged with its index."""

    def __init__(self, count: int = 1) -> None:
        self.tabs = [EventSourceTab() for _ in range(count)]
        self.stderr = ""
        self.ended: Deferred[None] = Deferred()
        self._partial = b""

    def start(self, node: str, urls: Sequence[str], ca_certificate: Path) -> None:
        """Open one EventSource for each of ``urls`` (as many as tabs), from CLIENT_ADDRESS."""
        assert len(urls) == len(self.tabs)
        argv = [node, str(EVENTSOURCE_CLIENT / "client.mjs"), CLIENT_ADDRESS, *urls]
        self.transport = reactor.spawnProcess(  # type: ignore[attr-defined]
            self,
            node,
            argv,
            env={"PATH": os.environ["PATH"], "NODE_EXTRA_CA_CERTS": str(ca_certificate)},
            path=str(EVENTSOURCE_CLIENT),
        )

    def outReceived(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            happened = json.loads(line)
            self.tabs[happened["source"]].happened(happened)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data.decode("utf-8", "replace")

    def processEnded(self, reason: Failure) -> None:
        for tab in self.tabs:
            tab.streaming = False
            tab.process_ended = True
        self.ended.callback(None)

    async def stop(self) -> None:
        if not self.ended.called:
            self.transport.signalProcess(signal.SIGTERM)
        await bounded(self.ended)
