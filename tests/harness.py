"""An sse-twisted server on the test reactor, a browser-like SSE client and a publisher."""

from __future__ import annotations

import datetime
import http.client
import json
import os
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, Response
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from sse_twisted._config import Config, load_config
from sse_twisted.devcerts import (
    DEV_CERTIFICATE_FILES,
    issue_certificate,
    load_certificate_authority,
    write_certificate,
    write_private_key,
)
from sse_twisted.tap import SSEService, build_service
from tests.backends import PostgresServer
from tests.sse_parser import EventParser

TIMEOUT = 20
TWISTD = Path(sys.executable).parent / "twistd"


# What the suite hands to servers as secrets, and every log line servers wrote: at the end of
# the session tests/conftest.py fails the run if any secret is in any line.
USED_SECRETS: set[str] = set()
LOGGED_TEXT: list[str] = []


def new_uuid() -> str:
    """A fresh lowercase v4 UUID."""
    return str(uuid.uuid4())


def new_token() -> str:
    """A fresh subscriber token (a v4 UUID), remembered as a secret no log may contain."""
    token = new_uuid()
    USED_SECRETS.add(token)
    return token


def leaked_secrets(texts: list[str], secrets: set[str]) -> dict[str, str]:
    """Each secret found in ``texts`` (case-insensitively), with the line it is in."""
    found: dict[str, str] = {}
    lines = [line for text in texts for line in text.splitlines()]
    lowered = [line.lower() for line in lines]
    for secret in secrets:
        for line, low in zip(lines, lowered, strict=True):
            if secret.lower() in low:
                found[secret] = line
                break
    return found


def new_password() -> str:
    """A fresh password, remembered as a secret no log may contain."""
    password = f"pw-{uuid.uuid4().hex}"
    USED_SECRETS.add(password)
    return password


def bounded(waiting: Deferred[Any], seconds: float = TIMEOUT) -> Deferred[Any]:
    """``waiting``, failed with TimeoutError if it has not fired in ``seconds``."""
    return waiting.addTimeout(seconds, reactor)


@dataclass
class RunningServer:
    """An in-process server: its config, service tree, the port it bound and fatal errors."""

    config: Config
    service: SSEService
    port: int
    fatal: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """Where a browser reaches it."""
        return f"https://localhost:{self.port}"

    def subscribe_url(self, topic: str, userid: str, nonce: str) -> str:
        """The URL a browser's EventSource would open."""
        return f"{self.base_url}/subscribe/{topic}/{userid}/{nonce}"

    async def stop(self) -> None:
        """Stop every service; open streams are closed, and so is the daily log file
        (twistd's process exit closes it; a server in the test process must)."""
        await self.service.stopService()
        self.service.log_observer.close()


async def start_server(environ: Mapping[str, str]) -> RunningServer:
    """Start a server on a free port with ``environ`` as its SSE_* settings; wait until it
    listens and consumes."""
    config = load_config(
        {"SSE_PORT": "0", "SSE_LISTEN_ADDRESS": "127.0.0.1", "SSE_METRICS_PORT": "0", **environ}
    )
    fatal: list[str] = []
    service = build_service(config, reactor, on_fatal=fatal.append)
    service.startService()
    port = await bounded(service.listener.listening)
    running = RunningServer(config, service, port.getHost().port, fatal)
    await wait_for(lambda: service.consumer.consuming, "consumer never started")
    return running


async def wait_for(condition: Any, what: str, seconds: float = TIMEOUT) -> None:
    """Poll ``condition`` each reactor tick (where no event signals it) until true."""
    from twisted.internet.task import deferLater

    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise TimeoutError(what)
        await deferLater(reactor, 0.02, lambda: None)


class EventCollector(Protocol):
    """Reads an event-stream body as a browser would, queueing each dispatched event."""

    def __init__(self) -> None:
        self.parser = EventParser()
        self.events: DeferredQueue[dict[str, str]] = DeferredQueue()
        self.received: list[dict[str, str]] = []
        self.raw = b""
        self.closed: Deferred[None] = Deferred()
        self.close_reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        for event in self.parser.feed(data):
            self.received.append(event)
            self.events.put(event)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.close_reason = reason
        self.closed.callback(None)

    async def next_event(self, seconds: float = TIMEOUT) -> dict[str, str]:
        """The next event, failing after ``seconds``."""
        return await bounded(self.events.get(), seconds)

    def close(self) -> None:
        """Drop the connection, as a closed browser tab does."""
        if not self.closed.called and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


@implementer(IAgentEndpointFactory)
@dataclass
class _FromAddress:
    """Connects to 127.0.0.1 from ``source`` (any 127.0.0.0/8 address routes to lo)."""

    policy: BrowserLikePolicyForHTTPS
    source: str

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", uri.port, bindAddress=(self.source, 0))
        return wrapClientTLS(self.policy.creatorForNetloc(uri.host, uri.port), endpoint)


@dataclass
class Browser:
    """An HTTPS client trusting the test CA, one TLS connection per stream; connecting from
    ``source_address`` (another loopback address, say) when given."""

    ca_certificate: Path
    streams: list[EventCollector] = field(default_factory=list)
    source_address: str | None = None

    def __post_init__(self) -> None:
        policy = BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(self.ca_certificate.read_bytes())
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        if self.source_address is None:
            self._agent = Agent(reactor, policy, pool=pool)
        else:
            endpoints = _FromAddress(policy, self.source_address)
            self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)

    async def get(self, url: str, headers: dict[bytes, list[bytes]] | None = None) -> Response:
        """The response to ``GET url`` (its body not read)."""
        return await bounded(
            self._agent.request(b"GET", url.encode("ascii"), Headers(headers or {}))
        )

    async def open(
        self, url: str, last_event_id: str | None = None
    ) -> tuple[Response, EventCollector]:
        """Open an event stream, resuming after ``last_event_id`` as a reconnecting
        EventSource does; the collector receives its events."""
        headers = {b"accept": [b"text/event-stream"]}
        if last_event_id is not None:
            headers[b"last-event-id"] = [last_event_id.encode()]
        response = await self.get(url, headers)
        collector = EventCollector()
        response.deliverBody(collector)
        self.streams.append(collector)
        return response, collector

    async def read_body(self, response: Response) -> bytes:
        """The whole body of a response that ends."""
        collector = EventCollector()
        response.deliverBody(collector)
        await bounded(collector.closed)
        return collector.raw

    async def close_all(self) -> None:
        """Close every stream this browser opened and wait for the connections to end."""
        for stream in self.streams:
            stream.close()
        for stream in self.streams:
            await bounded(stream.closed)


class TwistdProcess(ProcessProtocol):
    """A running twistd whose stdout is read as JSON lines."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw = b""
        self.stderr = b""
        self.port: Deferred[int] = Deferred()
        self.consuming: Deferred[None] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self.raw += data
        LOGGED_TEXT.append(data.decode("utf-8", "replace"))
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            record = json.loads(line)
            self.lines.append(record)
            if record["message"].startswith("listening on") and not self.port.called:
                self.port.callback(record["port"])
            if record["message"].startswith("consuming ") and not self.consuming.called:
                self.consuming.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        LOGGED_TEXT.append(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))  # type: ignore[attr-defined]


# Sets RLIMIT_NOFILE to (argv[1], argv[2]), then becomes argv[3:], as a shell's `ulimit` would.
_WITH_OPEN_FILES = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


def spawn_twistd(
    environ: Mapping[str, str],
    cwd: Path,
    *,
    open_files: tuple[int, int] | None = None,
    listening_socket: socket.socket | None = None,
) -> tuple[TwistdProcess, Any]:
    """Start ``twistd -n sse-server`` with only ``environ`` (and PATH) as its environment,
    and with ``open_files`` as its (soft, hard) open-file limit when given.

    With ``listening_socket``, the server gets it the way systemd passes a socket unit's
    socket (sd_listen_fds(3)): as descriptor 3, with LISTEN_FDS=1, LISTEN_FDNAMES and
    LISTEN_PID naming the server's own process (the shell sets it to its pid, then execs)."""
    process = TwistdProcess()
    command = [str(TWISTD), "-n", "--pidfile=", "sse-server"]
    child_descriptors: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
    environ = {"PATH": os.environ["PATH"], **environ}
    if listening_socket is not None:
        command = ["/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *command]
        child_descriptors[3] = listening_socket.fileno()
        environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="https")
    if open_files is not None:
        command = [sys.executable, "-c", _WITH_OPEN_FILES, *map(str, open_files), *command]
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        process, command[0], command, env=environ, path=str(cwd), childFDs=child_descriptors
    )
    return process, transport


def _until_ready(port: int, ca: Path) -> None:
    """Ask ``/readyz`` on ``port`` until it answers 200 (blocking: run it in a thread)."""
    context = ssl.create_default_context(cafile=str(ca))
    while True:
        connection = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
        try:
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        finally:
            connection.close()
        time.sleep(0.05)


class Instance:
    """A twistd process serving on its own port (``SSE_PORT``), sharing the stream with the
    others."""

    def __init__(self, environ: dict[str, str], cwd: Path) -> None:
        self.process, self.transport = spawn_twistd(environ, cwd)
        self.port = 0
        self._ca = Path(environ["SSE_CERTS_DIR"]) / "ca.pem"

    async def ready(self) -> None:
        """Once it listens, consumes and answers ``/readyz`` with 200 (its read-back is
        over): when a load balancer would start sending it browsers."""
        self.port = await bounded(self.process.port, 30)
        await bounded(self.process.consuming, 30)
        await bounded(deferToThread(_until_ready, self.port, self._ca), 30)

    def url(self, topic: str, userid: str, token: str) -> str:
        return f"https://localhost:{self.port}/subscribe/{topic}/{userid}/{token}"

    async def kill(self, how: int) -> None:
        self.transport.signalProcess(how)
        await bounded(self.process.ended, 30)


def add_subscriber(postgres: PostgresServer) -> tuple[str, str]:
    """A new (userid, token) row in the users table of ``postgres``."""
    userid, token = new_uuid(), new_token()
    postgres.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
    return userid, token


def add_local_subscriber(database: str) -> tuple[str, str]:
    """A new (userid, token) row in ``database`` on the machine's own PostgreSQL."""
    userid, token = new_uuid(), new_token()
    with (
        psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
    return userid, token


def found_contract(userid: str, **extra: Any) -> dict[str, Any]:
    """The example message of the issue, for ``userid``."""
    return {
        "userid": userid,
        "filename": "report.pdf",
        "filepath": "/x/report.pdf",
        "finished": False,
        "type": "foundcontract",
        **extra,
    }


def delete_queue(port: int, queue: str) -> None:
    """Delete ``queue`` from the broker's plain AMQP ``port``, if it is there: each stream
    queue holds files open in the broker, whose descriptors are few (1,024 by default)."""
    with suppress(pika.exceptions.AMQPError):
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", port))
        try:
            connection.channel().queue_delete(queue)
        finally:
            connection.close()


def _publish_blocking(
    parameters: pika.ConnectionParameters,
    queue: str,
    bodies: list[bytes],
    broker_wait_seconds: float = 0,
) -> None:
    deadline = time.monotonic() + broker_wait_seconds
    while True:
        try:
            connection = pika.BlockingConnection(parameters)
            break
        except pika.exceptions.AMQPConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            _publish_until_routed(channel, queue, body)
    finally:
        connection.close()


def _publish_until_routed(channel: Any, queue: str, body: bytes) -> None:
    # Right after a broker restart a stream queue exists but is not routable for a moment,
    # and RabbitMQ gives no signal for when it is: the returned message is the only sign.
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            channel.basic_publish("", queue, body, mandatory=True)
            return
        except pika.exceptions.UnroutableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def publish(
    port: int,
    queue: str,
    *messages: Mapping[str, Any] | bytes,
    tls: ssl.SSLContext | None = None,
    broker_wait_seconds: float = 0,
) -> Deferred[None]:
    """Publish to ``queue`` through the default exchange, pretty-printed like the issue's
    example, with publisher confirms; runs the blocking client in a thread.

    With ``broker_wait_seconds``, a broker that refuses connections is tried again for
    that long, as a producer with retries does through an outage."""
    bodies = [
        message if isinstance(message, bytes) else json.dumps(message, indent=2).encode()
        for message in messages
    ]
    parameters = pika.ConnectionParameters(
        host="localhost" if tls else "127.0.0.1",
        port=port,
        ssl_options=pika.SSLOptions(tls, "localhost") if tls else None,
    )
    return bounded(
        deferToThread(_publish_blocking, parameters, queue, bodies, broker_wait_seconds),
        TIMEOUT + broker_wait_seconds,
    )


def renew_certificate(
    certs_dir: Path, *, with_key: bool = True, days: int = 90
) -> x509.Certificate:
    """Issue a new localhost certificate for ``days`` from the dev CA and move it over
    cert.pem (and its key over key.pem), each by an atomic rename, as ACME clients do."""
    files = DEV_CERTIFICATE_FILES
    authority = load_certificate_authority(
        certs_dir / files.ca_certificate, certs_dir / files.ca_key
    )
    certificate, key = issue_certificate(
        authority, ["localhost", "127.0.0.1"], lifetime=datetime.timedelta(days=days)
    )
    if with_key:
        write_private_key(certs_dir / "key.pem.new", key)
        os.replace(certs_dir / "key.pem.new", certs_dir / "key.pem")
    write_certificate(certs_dir / "cert.pem.new", certificate)
    os.replace(certs_dir / "cert.pem.new", certs_dir / "cert.pem")
    return certificate
