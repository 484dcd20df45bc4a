"""A client that vanishes without a FIN or RST (a laptop losing its Wi-Fi) is dropped.

The client runs in a network namespace of its own, joined to the test's by a veth pair; once
its stream is open, every packet on that link is silently discarded in both directions. Only
the server's keep-alive comments then go unacknowledged, and TCP_USER_TIMEOUT (set on the
listening socket) is what makes the kernel give up on them in seconds rather than after
``tcp_retries2`` retransmissions (about fifteen minutes): with it off, this test fails.

Needs root and iproute2 (``ip``, ``tc``); skipped otherwise.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from sse_twisted._streams import StreamRegistry
from tests.backends import Pki
from tests.browser import Browser
from tests.in_process_server import start_server
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.waiting import bounded, wait_for

USER_TIMEOUT_SECONDS = 2.0
HEARTBEAT_SECONDS = 0.5
# The first keep-alive after the cut leaves within one heartbeat; the kernel aborts the
# connection once it has gone unacknowledged for the user timeout. The rest is slack for a
# busy two-core machine, far below the quarter of an hour the kernel takes without the option.
DETECTION_BOUND_SECONDS = USER_TIMEOUT_SECONDS + 2 * HEARTBEAT_SECONDS + 2.0

_PRIVATE_RANGE = ipaddress.IPv4Network("10.213.0.0/16")

# Prints "open" once the stream is open, then reads until the connection ends; it never
# closes its end by itself, so the server learns nothing when the link goes silent.
_VANISHING_CLIENT = """
import socket, ssl, sys
host, port, ca, path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
raw = socket.create_connection((host, port), timeout=20)
tls = ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname="localhost")
tls.sendall(f"GET {path} HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n".encode())
seen = b""
while b": connected" not in seen:
    chunk = tls.recv(4096)
    if not chunk:
        sys.exit("the stream ended before it opened: " + repr(seen))
    seen += chunk
tls.settimeout(None)
print("open", flush=True)
while tls.recv(4096):
    pass
"""


def _run(command: str) -> None:
    """Run an iproute2 command line (its words never need quoting here); raise on failure."""
    subprocess.run(command.split(), check=True, capture_output=True, text=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.213.0.0/16 that no interface of this machine uses (runs may overlap)."""
    listing = subprocess.run(
        ["ip", "-o", "-4", "addr", "show"], check=True, capture_output=True, text=True
    ).stdout
    subnets = list(_PRIVATE_RANGE.subnets(new_prefix=30))
    while True:
        subnet = random.choice(subnets)
        if f" {subnet[1]}/" not in listing and f" {subnet[2]}/" not in listing:
            return subnet


@dataclass
class VethLink:
    """A network namespace reached from the test's own through a veth pair."""

    namespace: str
    outer_interface: str
    inner_interface: str
    outer_address: str
    inner_address: str
    processes: list[subprocess.Popen[str]] = field(default_factory=list)

    def spawn(self, *argv: str) -> subprocess.Popen[str]:
        """Run ``argv`` inside the namespace, its stdout a pipe; it is killed at teardown."""
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.processes.append(process)
        return process

    def cut(self) -> None:
        """Discard every packet on the link, both ways, saying nothing to either end.

        The blackhole qdisc drops what it is given and reports it sent, as a frame lost on
        the air would be: no RST, no ICMP, and both interfaces stay up with their carrier.
        Taking a veth down would instead be a local event on the server's side (its carrier
        drops); netem, nftables and iptables are missing on this project's machines.
        """
        _run(f"tc -n {self.namespace} qdisc replace dev {self.inner_interface} root blackhole")
        _run(f"tc qdisc replace dev {self.outer_interface} root blackhole")

    def remove(self) -> None:
        """Kill the processes inside, then delete the namespace and the pair; never raises."""
        for process in self.processes:
            process.kill()
            process.communicate()
        subprocess.run(["ip", "netns", "del", self.namespace], check=False, capture_output=True)
        # Deleting the namespace destroys its end, which takes ours; this is for a setup
        # that failed before the pair was complete.
        subprocess.run(
            ["ip", "link", "del", self.outer_interface], check=False, capture_output=True
        )


@pytest.fixture
def veth_link() -> Iterator[VethLink]:
    """A fresh namespace and veth pair, with names and a /30 unique to this run."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (Debian package iproute2)")
    suffix = uuid.uuid4().hex[:8]
    subnet = _free_subnet()
    link = VethLink(
        namespace=f"sse-half-open-{suffix}",
        outer_interface=f"sho{suffix}o",
        inner_interface=f"sho{suffix}i",
        outer_address=str(subnet[1]),
        inner_address=str(subnet[2]),
    )
    try:
        namespace, outer, inner = link.namespace, link.outer_interface, link.inner_interface
        _run(f"ip netns add {namespace}")
        _run(f"ip link add {outer} type veth peer name {inner} netns {namespace}")
        _run(f"ip addr add {link.outer_address}/30 dev {outer}")
        _run(f"ip link set {outer} up")
        _run(f"ip -n {namespace} addr add {link.inner_address}/30 dev {inner}")
        _run(f"ip -n {namespace} link set {inner} up")
        yield link
    finally:
        link.remove()


def _weak_references(registry: StreamRegistry, userid: str) -> list[weakref.ref[Any]]:
    """Weak references to the user's only open request and its HTTP connection.

    EventStream has __slots__ without __weakref__; it holds its request strongly, so the
    request's death proves the stream's too. No strong reference outlives this call.
    """
    (stream,) = registry.streams_of(userid)
    return [weakref.ref(stream.request), weakref.ref(stream.request.channel)]


def _all_collected(references: list[weakref.ref[Any]]) -> bool:
    gc.collect()
    return all(reference() is None for reference in references)


def _wait_until_open(client: subprocess.Popen[str]) -> None:
    assert client.stdout is not None
    if client.stdout.readline() != "open\n":
        client.kill()
        _, error = client.communicate()
        raise AssertionError(f"the client in the namespace never opened its stream: {error}")


@pytest_twisted.ensureDeferred
async def test_a_client_whose_link_goes_silent_is_dropped_within_the_user_timeout_and_freed(
    plaintext_environ: dict[str, str], browser: Browser, pki: Pki, veth_link: VethLink
) -> None:
    server = await start_server(
        {
            **plaintext_environ,
            # The vanishing client reaches the server through the veth, the other browser
            # through loopback: the server listens on both.
            "SSE_LISTEN_ADDRESS": "0.0.0.0",
            "SSE_TCP_USER_TIMEOUT_SECONDS": str(USER_TIMEOUT_SECONDS),
            "SSE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS),
            "SSE_DRAIN_SECONDS": "1",
        }
    )
    registry = server.service.registry
    database = plaintext_environ["SSE_POSTGRES_DB_NAME"]
    try:
        staying, staying_token = add_local_subscriber(database)
        _, healthy = await browser.open(server.subscribe_url(new_uuid(), staying, staying_token))
        await wait_for(lambda: len(registry) == 1, "the healthy stream open")
        baseline = len(registry)

        vanishing, vanishing_token = add_local_subscriber(database)
        port = str(server.port)
        client = veth_link.spawn(
            sys.executable,
            "-c",
            _VANISHING_CLIENT,
            veth_link.outer_address,
            port,
            str(pki.ca_certificate),
            f"/subscribe/{new_uuid()}/{vanishing}/{vanishing_token}",
        )
        await bounded(deferToThread(_wait_until_open, client))
        assert registry.count_of(vanishing) == 1
        references = _weak_references(registry, vanishing)

        veth_link.cut()
        cut_at = time.monotonic()
        await wait_for(
            lambda: registry.count_of(vanishing) == 0,
            "the vanished client's stream dropped",
            DETECTION_BOUND_SECONDS,
        )
        detected = time.monotonic() - cut_at
        # Nothing told the server: the client is still running, its end of the connection
        # open, and the drop came no sooner than the unacknowledged data allows.
        assert client.poll() is None
        assert detected >= USER_TIMEOUT_SECONDS

        assert len(registry) == baseline
        # The heartbeat round in progress may still hold the stream until it ends.
        await wait_for(
            lambda: _all_collected(references), "the dropped request and connection freed"
        )

        await publish(5672, server.config.rabbitmq_queue_name, found_contract(staying))
        event = await healthy.next_event()
        assert json.loads(event["data"])["userid"] == staying
        assert not healthy.closed.called
        print(f"vanished client dropped {detected:.2f}s after its link went silent")
    finally:
        await server.stop()
