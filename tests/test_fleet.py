"""A sharded fleet behind the shipped edge (deploy/haproxy/haproxy-sharded.cfg and
shards.map), all real: 2 shards x 2 twistd instances on a super stream of 4 partitions of
the machine's RabbitMQ, the machine's PostgreSQL, HAProxy, and 400 EventSources of the npm
``eventsource`` package (200 users with 2 tabs each). Every event reaches each of its user's
tabs once and in order, each instance consumes only its shard's partitions, a SIGKILLed
instance's browsers resume on the other instance of its shard, and a subscribe that reaches
the wrong shard is sent back to be routed right."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pika
import psycopg2
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from sse_twisted._partitions import partition_of
from tests.backends import Pki, free_port
from tests.browser import Browser
from tests.proxies import (
    CLIENT_ADDRESS,
    DEPLOY,
    EventSourceClients,
    EventSourceTab,
    binary,
    haproxy_command,
    listening,
    render,
    spawn,
    until_haproxy_checked,
)
from tests.publishing import delete_super_stream, found_contract
from tests.secrets_tracking import new_token, new_uuid
from tests.twistd_processes import Instance
from tests.waiting import bounded, wait_for

PARTITIONS = 4
# As deploy/haproxy/shards.map says: the backend of each shard, and its partitions.
SHARDS = {"shard_a": (0, 1), "shard_b": (2, 3)}
# The address of each instance in the shipped file, by server name.
SHIPPED_SERVERS = {
    "a1": "10.0.0.11:8001",
    "a2": "10.0.0.12:8001",
    "b1": "10.0.0.21:8001",
    "b2": "10.0.0.22:8001",
}
USERS = 200
TABS_PER_USER = 2
MESSAGES = 5000
# The instance killed, after this many messages.
KILLED, KILLED_AFTER = "a1", 2000
# The machine is shared and loaded: generous deadlines (the run takes far less when quiet).
SLOW = 120


@pytest.fixture
def fleet_environ(plaintext_environ: dict[str, str]) -> Iterator[dict[str, str]]:
    """Settings every instance shares: a super stream of its own (deleted after)."""
    name = f"messages-{new_uuid()}"
    yield {
        **plaintext_environ,
        "SSE_RABBITMQ_QUEUE_NAME": name,
        "SSE_RABBITMQ_PARTITIONS": str(PARTITIONS),
        "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "1",
        "SSE_LOGS_DIR": "",
        "SSE_TRUSTED_PROXIES": "127.0.0.1",
        "SSE_RETRY_MILLISECONDS": "200",
        "SSE_RECONNECT_JITTER_MILLISECONDS": "300",
        # Every tab connects from CLIENT_ADDRESS: the per-address limit is for browsers.
        "SSE_MAX_AUTH_CHECKS_PER_CLIENT": "1000",
    }
    delete_super_stream(5672, name, PARTITIONS)


def add_users(database: str, count: int) -> dict[str, str]:
    """``count`` new users (userid -> token) in ``database``, in one transaction."""
    users = {new_uuid(): new_token() for _ in range(count)}
    with (
        psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database) as connection,
        connection.cursor() as cursor,
    ):
        cursor.executemany("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", users.items())
    return users


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """An instance's metrics: (sample name, labels) -> value (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def partition_samples(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[int]:
    """The partitions an instance reports an offset for."""
    return {
        int(dict(labels)["partition"]) for name, labels in metrics if name == "sse_partition_offset"
    }


class Publisher:
    """Publishes messages numbered per user, each to the super stream's exchange with its
    user's partition as routing key (what ``python -m sse_twisted.publish --partitions``
    does), with publisher confirms; run it in a thread."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.published: Counter[str] = Counter()
        self.count = 0
        self.by_partition: Counter[int] = Counter()

    def run(self, users: list[str], total: int) -> None:
        """Publish ``total`` messages, to each of ``users`` in turn (in a scrambled order)."""
        connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            started = time.monotonic()
            for number in range(total):
                userid = users[number * 7919 % len(users)]
                partition = partition_of(userid, PARTITIONS)
                body = json.dumps(found_contract(userid, seq=self.published[userid]))
                channel.basic_publish(self.stream, str(partition), body.encode(), mandatory=True)
                self.published[userid] += 1
                self.by_partition[partition] += 1
                self.count += 1
                # At most 250 a second: the kill lands mid-run, and the run stays short.
                ahead = (number + 1) / 250 - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        finally:
            connection.close()


def streams_on(metrics_ports: dict[str, int], servers: tuple[str, ...]) -> float:
    """The streams open on ``servers`` (blocking)."""
    return sum(
        value
        for server in servers
        for (name, _), value in scrape(metrics_ports[server]).items()
        if name == "sse_open_streams"
    )


def sequence(tab: EventSourceTab) -> list[int]:
    return [json.loads(event["data"])["seq"] for event in tab.events if event["event"] == "message"]


@pytest_twisted.async_yield_fixture
async def direct_browser(pki: Pki) -> AsyncIterator[Browser]:
    client = Browser(pki.ca_certificate, source_address=CLIENT_ADDRESS)
    yield client
    await client.close_all()


@pytest_twisted.ensureDeferred
async def test_a_sharded_fleet_behind_haproxy_delivers_each_event_once_to_its_shard_only(
    tmp_path: Path,
    pki: Pki,
    fleet_environ: dict[str, str],
    direct_browser: Browser,
    node: str,
) -> None:
    haproxy = binary("haproxy")
    stream = fleet_environ["SSE_RABBITMQ_QUEUE_NAME"]
    ports = {server: free_port() for server in SHIPPED_SERVERS}
    metrics_ports = {server: free_port() for server in SHIPPED_SERVERS}
    environs = {
        server: {
            **fleet_environ,
            "SSE_PORT": str(ports[server]),
            "SSE_METRICS_PORT": str(metrics_ports[server]),
            "SSE_PARTITIONS": ",".join(map(str, SHARDS[f"shard_{server[0]}"])),
        }
        for server in SHIPPED_SERVERS
    }
    instances: dict[str, Instance] = {}
    for server, environ in environs.items():
        (tmp_path / server).mkdir()
        instances[server] = Instance(environ, tmp_path / server)
    proxy_directory = tmp_path / "proxy"
    proxy_directory.mkdir()
    users = add_users(fleet_environ["SSE_POSTGRES_DB_NAME"], USERS)
    clients = EventSourceClients(USERS * TABS_PER_USER)
    late = EventSourceClients(1)
    proxy_process = proxy_transport = None
    try:
        for instance in instances.values():
            await instance.ready(SLOW)
        # The shipped files, with only addresses and paths changed.
        stats_socket = proxy_directory / "admin.sock"
        shards_map = proxy_directory / "shards.map"
        shards_map.write_text((DEPLOY / "haproxy" / "shards.map").read_text())
        bundle = proxy_directory / "sse.pem"
        bundle.write_bytes(
            (pki.directory / "cert.pem").read_bytes() + (pki.directory / "key.pem").read_bytes()
        )
        proxy_port = free_port()
        (proxy_directory / "haproxy.cfg").write_text(
            render(
                DEPLOY / "haproxy" / "haproxy-sharded.cfg",
                {
                    "bind :::443 v4v6 ssl crt /etc/haproxy/certs/sse.pem": (
                        f"bind 127.0.0.1:{proxy_port} ssl crt {bundle}"
                    ),
                    **{
                        address: f"127.0.0.1:{ports[server]}"
                        for server, address in SHIPPED_SERVERS.items()
                    },
                    "/etc/haproxy/shards.map": str(shards_map),
                    "/etc/sse/certs/": f"{pki.directory}/",
                    "    chroot /var/lib/haproxy\n": "",
                    "    user haproxy\n    group haproxy\n": "",
                    "/run/haproxy/admin.sock": str(stats_socket),
                },
            )
        )
        proxy_process, proxy_transport = spawn(
            [haproxy, "-db", "-f", str(proxy_directory / "haproxy.cfg")], proxy_directory
        )
        await listening(proxy_port, proxy_process)
        for server in SHIPPED_SERVERS:
            await until_haproxy_checked(stats_socket, f"shard_{server[0]}", server, SLOW)

        # 200 users, 2 tabs each, through the edge.
        tab_users = [userid for userid in users for _ in range(TABS_PER_USER)]
        base = f"https://localhost:{proxy_port}"
        clients.start(
            node,
            [f"{base}/subscribe/{new_uuid()}/{u}/{users[u]}" for u in tab_users],
            pki.ca_certificate,
        )

        def all_streaming() -> bool:
            gone = [tab.errors for tab in clients.tabs if tab.gave_up]
            assert gone == [], f"tabs gave up for good: {gone[:3]} {clients.stderr}"
            return all(tab.streaming for tab in clients.tabs)

        await wait_for(all_streaming, "every tab streaming", SLOW)
        # Spread over the whole fleet: every instance holds streams, and only of its users.
        before_kill = {
            server: await deferToThread(scrape, metrics_ports[server]) for server in instances
        }
        for server, metrics in before_kill.items():
            assert await deferToThread(streams_on, metrics_ports, (server,)) > 0, server
            assert partition_samples(metrics) <= set(SHARDS[f"shard_{server[0]}"])

        publisher = Publisher(stream)
        publishing = deferToThread(publisher.run, list(users), MESSAGES)
        await wait_for(lambda: publisher.count >= KILLED_AFTER, "messages published", SLOW)
        await instances[KILLED].kill(signal.SIGKILL)
        await bounded(publishing, SLOW)

        def delivered() -> bool:
            all_streaming()
            return all(
                len(tab.events) >= publisher.published[userid]
                for tab, userid in zip(clients.tabs, tab_users, strict=True)
            )

        await wait_for(delivered, "every event at every tab", SLOW)

        # Straight to an instance of the wrong shard: a 200 that asks to come back.
        misplaced = next(u for u in users if partition_of(u, PARTITIONS) in SHARDS["shard_a"])
        wrong = instances["b1"].url(new_uuid(), misplaced, users[misplaced])
        response = await direct_browser.get(wrong)
        body = await direct_browser.read_body(response)
        assert response.code == 200
        assert body.startswith(b"retry: ")
        assert b": not this server's partition, retry\n" in body
        assert b"data:" not in body
        wrong_metrics = await deferToThread(scrape, metrics_ports["b1"])
        assert wrong_metrics[("sse_subscribes_total", (("outcome", "wrong_shard"),))] == 1
        [warning] = [
            line for line in instances["b1"].process.lines if "wrong_shard" in line["message"]
        ]
        assert warning["@level"] == "warn"

        # A table being changed: the edge sends partition 2 to shard A for a while. A new
        # tab of a partition-2 user is asked to come back, and once the table is right
        # again it is served by shard B.
        moved = next(u for u in users if partition_of(u, PARTITIONS) == 2)
        map_line = f"set map {shards_map} 2 shard_a"
        assert await deferToThread(haproxy_command, stats_socket, map_line) == "\n"
        late.start(
            node, [f"{base}/subscribe/{new_uuid()}/{moved}/{users[moved]}"], pki.ca_certificate
        )

        def sent_back() -> float:
            metrics = scrape(metrics_ports["a2"])
            return metrics.get(("sse_subscribes_total", (("outcome", "wrong_shard"),)), 0)

        await wait_for(lambda: late.tabs[0].opens >= 2, "the tab sent back twice", SLOW)
        assert await deferToThread(sent_back) >= 2
        map_line = f"set map {shards_map} 2 shard_b"
        assert await deferToThread(haproxy_command, stats_socket, map_line) == "\n"
        expected_on_b = TABS_PER_USER * sum(
            1 for u in users if partition_of(u, PARTITIONS) in SHARDS["shard_b"]
        )
        assert await deferToThread(streams_on, metrics_ports, ("b1", "b2")) == expected_on_b
        deadline = time.monotonic() + SLOW
        while await deferToThread(streams_on, metrics_ports, ("b1", "b2")) == expected_on_b:
            assert time.monotonic() < deadline, "the tab was never served by shard B"
            await deferLater(reactor, 0.2, lambda: None)
        await bounded(deferToThread(publisher.run, [moved], 1))
        await wait_for(
            lambda: sequence(late.tabs[0]) == [publisher.published[moved] - 1],
            "the late tab's event",
            SLOW,
        )
        await wait_for(delivered, "the event at the user's other tabs", SLOW)

        after = {
            server: await deferToThread(scrape, metrics_ports[server])
            for server in instances
            if server != KILLED
        }
    finally:
        for process in (clients, late):
            if getattr(process, "transport", None) is not None:
                await process.stop()
        for instance in instances.values():
            if instance.process.transport is not None and not instance.process.ended.called:
                await instance.kill(signal.SIGTERM)
        if proxy_process is not None and proxy_transport is not None:
            if not proxy_process.ended.called:
                proxy_transport.signalProcess(signal.SIGTERM)
            await bounded(proxy_process.ended)
            # Kept beside the test's other files, for a failure's post-mortem.
            (proxy_directory / "haproxy.log").write_text(proxy_process.output)

    # Every event once, in order, at every tab; the killed instance's tabs came back.
    cut = set()
    for number, (tab, userid) in enumerate(zip(clients.tabs, tab_users, strict=True)):
        assert tab.refused == [], "only 200 answers"
        assert [e["event"] for e in tab.events if e["event"] != "message"] == []
        assert sequence(tab) == list(range(publisher.published[userid])), userid
        if tab.failures:
            cut.add(number)
            assert tab.opens >= 2, "the tab resumed"
    # The tabs whose stream the kill cut are users of the killed instance's shard.
    assert cut, "the kill cut no stream"
    assert {partition_of(tab_users[number], PARTITIONS) for number in cut} <= set(SHARDS["shard_a"])

    # Each instance consumed exactly its shard's messages, nothing of the other shard's.
    for server, metrics in after.items():
        partitions = SHARDS[f"shard_{server[0]}"]
        assert partition_samples(metrics) == set(partitions)
        own = sum(publisher.by_partition[p] for p in partitions)
        assert metrics[("sse_messages_consumed_total", ())] == own, server
        skipped = metrics.get(("sse_messages_skipped_total", (("reason", "wrong_partition"),)), 0)
        assert skipped == 0
    # The edge routed every tab to its shard: the only requests sent back are this test's.
    wrong_shard = {
        server: metrics.get(("sse_subscribes_total", (("outcome", "wrong_shard"),)), 0)
        for server, metrics in after.items()
    }
    assert wrong_shard["b1"] == 1 and wrong_shard["b2"] == 0 and wrong_shard["a2"] >= 2
