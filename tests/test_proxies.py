"""The shipped proxy configurations (deploy/nginx/sse.conf, deploy/haproxy/haproxy.cfg), run
for real in front of two twistd instances: a rolling restart is seen by clients only as
reconnects, the real client address reaches the server, and no token reaches a proxy log."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.connection
import h2.events
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from sse_twisted._config import SETTINGS
from tests.backends import Pki, free_port
from tests.browser import Browser
from tests.proxies import (
    CLIENT_ADDRESS,
    DEPLOY,
    EventSourceClients,
    EventSourceTab,
    Proxy,
    binary,
    listening,
    render,
    spawn,
    until_haproxy_checked,
)
from tests.publishing import found_contract, publish
from tests.secrets_tracking import LOGGED_TEXT, leaked_secrets, new_uuid
from tests.sse_parser import EventParser
from tests.subscribers import add_local_subscriber
from tests.twistd_processes import Instance
from tests.waiting import TIMEOUT, bounded, wait_for


async def start_nginx(directory: Path, certs: Path, port: int, upstreams: list[int]) -> Proxy:
    """deploy/nginx/sse.conf inside a minimal main configuration (as Debian's nginx.conf
    includes conf.d/*.conf in its http block)."""
    nginx = binary("nginx")
    site = render(
        DEPLOY / "nginx" / "sse.conf",
        {
            "listen 443 ssl http2;": f"listen 127.0.0.1:{port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            "server 10.0.0.11:8001": f"server 127.0.0.1:{upstreams[0]}",
            "server 10.0.0.12:8001": f"server 127.0.0.1:{upstreams[1]}",
            "/etc/sse/certs/": f"{certs}/",
            "/var/log/nginx/": f"{directory}/",
        },
    )
    (directory / "sse.conf").write_text(site)
    temporary = " ".join(
        f"{kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (directory / "nginx.conf").write_text(
        f"daemon off;\npid {directory}/nginx.pid;\nerror_log stderr notice;\n"
        f"worker_processes 1;\nevents {{ worker_connections 256; }}\n"
        f"http {{ {temporary} include {directory}/sse.conf; }}\n"
    )
    process, transport = spawn([nginx, "-p", str(directory), "-c", "nginx.conf"], directory)
    await listening(port, process)
    return Proxy(
        port,
        process,
        transport,
        access_log=lambda: (directory / "sse-access.log").read_text(),
        # A request that found an instance stopped, then was answered by the other.
        retried=re.compile(r"upstream_status=502, 200"),
        # Passive: nginx tries every instance for each request.
        sees_up=lambda server: None,
    )


async def start_haproxy(directory: Path, certs: Path, port: int, upstreams: list[int]) -> Proxy:
    """deploy/haproxy/haproxy.cfg, in the foreground, without its chroot and user."""
    haproxy = binary("haproxy")
    bundle = directory / "sse.pem"
    stats_socket = directory / "admin.sock"
    bundle.write_bytes((certs / "cert.pem").read_bytes() + (certs / "key.pem").read_bytes())
    configuration = render(
        DEPLOY / "haproxy" / "haproxy.cfg",
        {
            "bind :::443 v4v6 ssl crt /etc/haproxy/certs/sse.pem": (
                f"bind 127.0.0.1:{port} ssl crt {bundle}"
            ),
            "server a 10.0.0.11:8001": f"server a 127.0.0.1:{upstreams[0]}",
            "server b 10.0.0.12:8001": f"server b 127.0.0.1:{upstreams[1]}",
            "/etc/sse/certs/": f"{certs}/",
            "    chroot /var/lib/haproxy\n": "",
            "    user haproxy\n    group haproxy\n": "",
            "/run/haproxy/admin.sock": str(stats_socket),
        },
    )
    (directory / "haproxy.cfg").write_text(configuration)
    process, transport = spawn([haproxy, "-db", "-f", str(directory / "haproxy.cfg")], directory)
    await listening(port, process)

    def sees_up(server: str) -> Deferred[None]:
        return Deferred.fromCoroutine(until_haproxy_checked(stats_socket, "sse_instances", server))

    return Proxy(
        port,
        process,
        transport,
        access_log=lambda: process.output,
        retried=re.compile(r" 200 .* retries=\+[1-9]"),
        sees_up=sees_up,
    )


@dataclass
class Publisher:
    """Publishes numbered messages for each user, alternately, until stopped."""

    queue: str
    users: list[str]
    published: dict[str, int] = field(default_factory=dict)
    stopped: bool = False

    async def more(self, count: int) -> None:
        """Until ``count`` more messages are published."""
        target = sum(self.published.values()) + count
        await wait_for(lambda: sum(self.published.values()) >= target, f"{count} more messages")

    async def run(self) -> None:
        number = 0
        while not self.stopped:
            userid = self.users[number % len(self.users)]
            sequence = self.published.get(userid, 0)
            await publish(5672, self.queue, found_contract(userid, seq=sequence))
            self.published[userid] = sequence + 1
            number += 1
            await deferLater(reactor, 0.05, lambda: None)


def sequence(client: EventSourceTab) -> list[int]:
    return [
        json.loads(event["data"])["seq"] for event in client.events if event["event"] == "message"
    ]


def _reconnected(
    clients: list[EventSourceTab],
    before: list[int],
    quantifier: Callable[[Any], bool],
) -> Callable[[], bool]:
    """Whether ``quantifier`` (any, all) of the clients opened a new stream since they had
    opened ``before`` streams, and every client has a stream open."""

    def reconnected() -> bool:
        gone = [client.errors for client in clients if client.gave_up]
        assert gone == [], f"a client got a non-200 and gave up for good: {gone}"
        return quantifier(
            client.opens > count for client, count in zip(clients, before, strict=True)
        ) and all(client.streaming for client in clients)

    return reconnected


def test_the_shipped_proxy_timeouts_outlast_two_default_heartbeats() -> None:
    # A stream is idle between heartbeats: a proxy timeout below SSE_HEARTBEAT_SECONDS cuts
    # every quiet stream (5 s did), and one barely above it cuts them on a late heartbeat.
    [heartbeat] = [s.default for s in SETTINGS if s.env == "SSE_HEARTBEAT_SECONDS"]
    nginx = (DEPLOY / "nginx" / "sse.conf").read_text()
    timeouts = {
        "proxy_read_timeout": re.findall(r"^\s*proxy_read_timeout (\d+)s;", nginx, re.M),
        "proxy_send_timeout": re.findall(r"^\s*proxy_send_timeout (\d+)s;", nginx, re.M),
    }
    # The single pool and the sharded edge.
    for name in ("haproxy.cfg", "haproxy-sharded.cfg"):
        haproxy = (DEPLOY / "haproxy" / name).read_text()
        for timeout in ("server", "client"):
            pattern = rf"^\s*timeout {timeout} (\d+)s$"
            timeouts[f"{name}: timeout {timeout}"] = re.findall(pattern, haproxy, re.M)
    assert all(len(values) == 1 for values in timeouts.values()), timeouts
    assert {name: int(value) >= 2 * float(heartbeat) for name, [value] in timeouts.items()} == {
        name: True for name in timeouts
    }


PROXIES = {"nginx": start_nginx, "haproxy": start_haproxy}
# Each user has several streams open (several tabs), spread over both instances.
CLIENTS_PER_USER = 2


@pytest_twisted.async_yield_fixture
async def clients_browser(pki: Pki) -> AsyncIterator[Browser]:
    """Browsers connecting from CLIENT_ADDRESS."""
    client = Browser(pki.ca_certificate, source_address=CLIENT_ADDRESS)
    yield client
    await client.close_all()


@pytest.mark.parametrize("proxy_name", sorted(PROXIES))
@pytest_twisted.ensureDeferred
async def test_a_rolling_restart_behind_the_proxy_is_seen_by_clients_only_as_reconnects(
    tmp_path: Path,
    pki: Pki,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    clients_browser: Browser,
    node: str,
    proxy_name: str,
) -> None:
    ports = [free_port(), free_port()]
    environs = [
        {
            **plaintext_environ,
            "SSE_PORT": str(port),
            "SSE_LOGS_DIR": "",
            "SSE_TRUSTED_PROXIES": "127.0.0.1",
            "SSE_RETRY_MILLISECONDS": "200",
            "SSE_RECONNECT_JITTER_MILLISECONDS": "300",
            "SSE_DRAIN_SECONDS": "3",
        }
        for port in ports
    ]
    for name in ("a", "b", "proxy"):
        (tmp_path / name).mkdir()
    first = Instance(environs[0], tmp_path / "a")
    second = Instance(environs[1], tmp_path / "b")
    instances = [first, second]
    proxy: Proxy | None = None
    clients: list[EventSourceTab] = []
    # One node process per client.
    processes: list[EventSourceClients] = []
    publisher: Publisher | None = None
    users: list[str] = []
    # The user of each client.
    subscribers: list[str] = []
    tokens: list[str] = []
    try:
        await first.ready()
        await second.ready()
        proxy = await PROXIES[proxy_name](tmp_path / "proxy", pki.directory, free_port(), ports)
        for server in ("a", "b"):
            sees_up = proxy.sees_up(server)
            if sees_up is not None:
                await bounded(sees_up)
        for _ in range(2):
            userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
            users.append(userid)
            tokens.append(token)
            for _ in range(CLIENTS_PER_USER):
                url = f"https://localhost:{proxy.port}/subscribe/{new_uuid()}/{userid}/{token}"
                process = EventSourceClients()
                processes.append(process)
                clients.append(process.tabs[0])
                subscribers.append(userid)
                process.start(node, [url], pki.ca_certificate)
        await wait_for(_reconnected(clients, [0 for _ in clients], all), "clients connected")
        publisher = Publisher(plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"], users)
        publishing = Deferred.fromCoroutine(publisher.run())

        await publisher.more(10)
        before = [client.opens for client in clients]
        await first.kill(signal.SIGTERM)
        # The clients of the first instance come back through the proxy to the second.
        await wait_for(_reconnected(clients, before, any), "clients back after the stop")
        # Events the restarted instance never consumed live: it must replay them later.
        await publisher.more(5)
        first = Instance(environs[0], tmp_path / "a")
        instances.append(first)
        sees_first_up = proxy.sees_up("a")
        await first.ready()
        if sees_first_up is not None:
            await bounded(sees_first_up)
        before = [client.opens for client in clients]
        await second.kill(signal.SIGTERM)
        # Every client was on the second instance: all come back, to the restarted first.
        await wait_for(_reconnected(clients, before, all), "clients back after the second stop")
        await publisher.more(5)
        publisher.stopped = True
        await bounded(publishing)
        for client, userid in zip(clients, subscribers, strict=True):
            await wait_for(
                lambda client=client, userid=userid: (
                    len(sequence(client)) >= publisher.published[userid]
                ),
                "every message",
            )
        # Spellings of a subscribe path (the first opens a stream), a token in a query and
        # a token elsewhere: the proxy's log must mask them all.
        topic, userid, token = new_uuid(), users[0], tokens[0]
        for path in (
            f"/%73ubscribe/{topic}/{userid}/{token}?token={token}",
            f"/subscribe%2F{topic}%2F{userid}%2F{token}",
            f"/subscribe/{topic}/{userid}/{token}/more",
            f"/elsewhere/{token}",
        ):
            _, answer = await clients_browser.open(f"https://localhost:{proxy.port}{path}")
            answer.close()
            await bounded(answer.closed)
    finally:
        if publisher is not None:
            publisher.stopped = True
        for process in processes:
            await process.stop()
        for instance in instances:
            if not instance.process.ended.called:
                await instance.kill(signal.SIGTERM)
        if proxy is not None:
            await proxy.stop()
        # The proxy's own log files join what the session audits for secrets.
        LOGGED_TEXT.extend(log.read_text() for log in (tmp_path / "proxy").glob("*.log"))

    assert proxy is not None and publisher is not None
    expected = {userid: list(range(count)) for userid, count in publisher.published.items()}
    for client, userid in zip(clients, subscribers, strict=True):
        assert client.refused == [], "only 200 answers"
        assert client.opens >= 2, "each client reconnected"
        assert client.failures == [], "every stream ended, none was cut"
        assert [e["event"] for e in client.events if e["event"] != "message"] == []
        assert sequence(client) == expected[userid], "every event once, in order"

    access_log = proxy.access_log()
    subscribe_lines = [line for line in access_log.splitlines() if "ubscribe" in line]
    assert len(subscribe_lines) >= sum(client.requests for client in clients) + 3
    assert all(CLIENT_ADDRESS in line and "/****" in line for line in subscribe_lines)
    assert "/elsewhere/****" in access_log
    assert any(proxy.retried.search(line) for line in subscribe_lines), access_log
    assert leaked_secrets([access_log, proxy.process.output], set(tokens)) == {}
    served = [
        line
        for instance in instances
        for line in instance.process.lines
        if line.get("logger") == "sse_twisted.access" and "/subscribe/" in line["path"]
    ]
    assert served and {line["client"] for line in served} == {CLIENT_ADDRESS}


class HTTP2Stream:
    """One event stream over HTTP/2 (as browsers open them through a proxy), read with
    blocking sockets: call its methods in a thread."""

    def __init__(self, port: int, ca_certificate: Path, path: str) -> None:
        context = ssl.create_default_context(cafile=str(ca_certificate))
        context.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.connection = context.wrap_socket(raw, server_hostname="localhost")
        self.protocol = self.connection.selected_alpn_protocol()
        self.client = h2.connection.H2Connection()
        self.client.initiate_connection()
        headers = [(":method", "GET"), (":path", path), (":scheme", "https")]
        headers += [(":authority", "localhost"), ("accept", "text/event-stream")]
        self.client.send_headers(1, headers, end_stream=True)
        self.connection.sendall(self.client.data_to_send())
        self._pending: list[h2.events.Event] = []

    def status(self) -> int:
        """The response's status, once its headers come."""
        while True:
            event = self._next()
            if isinstance(event, h2.events.ResponseReceived):
                return int(dict(event.headers)[b":status"])

    def next_data(self) -> str:
        """The data of the next event (heartbeat comments skipped)."""
        parser = EventParser()
        while True:
            event = self._next()
            if isinstance(event, h2.events.DataReceived):
                self.client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.connection.sendall(self.client.data_to_send())
                for dispatched in parser.feed(event.data):
                    return dispatched["data"]

    def _next(self) -> h2.events.Event:
        while not self._pending:
            data = self.connection.recv(65536)
            assert data, "the proxy closed the connection"
            self._pending = self.client.receive_data(data)
            self.connection.sendall(self.client.data_to_send())
        return self._pending.pop(0)

    def close(self) -> None:
        self.connection.close()


@pytest.mark.parametrize("proxy_name", sorted(PROXIES))
@pytest_twisted.ensureDeferred
async def test_a_browser_on_http2_gets_its_events_through_the_proxy(
    tmp_path: Path,
    pki: Pki,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    proxy_name: str,
) -> None:
    port = free_port()
    (tmp_path / "proxy").mkdir()
    instance = Instance({**plaintext_environ, "SSE_PORT": str(port), "SSE_LOGS_DIR": ""}, tmp_path)
    proxy: Proxy | None = None
    stream: HTTP2Stream | None = None
    try:
        await instance.ready()
        # The second instance of the configuration is not running: requests that meet it
        # go to the first.
        proxy = await PROXIES[proxy_name](
            tmp_path / "proxy", pki.directory, free_port(), [port, free_port()]
        )
        sees_up = proxy.sees_up("a")
        if sees_up is not None:
            await bounded(sees_up)
        userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
        stream = HTTP2Stream(
            proxy.port, pki.ca_certificate, f"/subscribe/{new_uuid()}/{userid}/{token}"
        )
        assert stream.protocol == "h2"
        assert await deferToThread(stream.status) == 200
        await publish(5672, plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"], found_contract(userid))
        # Not buffered: the one event arrives while the response is still open.
        data = await bounded(deferToThread(stream.next_data))
        assert json.loads(data)["userid"] == userid
    finally:
        if stream is not None:
            stream.close()
        if not instance.process.ended.called:
            await instance.kill(signal.SIGTERM)
        if proxy is not None:
            await proxy.stop()
        LOGGED_TEXT.extend(log.read_text() for log in (tmp_path / "proxy").glob("*.log"))
