"""HAProxy computes a user's partition exactly as the server and publishers do: its ``crc32``
converter (without ``avalanche``) is zlib's CRC-32, so the edge can route
``/subscribe/{topic}/{userid}/...`` to the userid's shard with
``path,field(4,/),lower,crc32,mod(P)``."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sse_twisted._partitions import partition_of
from tests.backends import free_port

SHARDED_EDGE = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy-sharded.cfg"
# .ci/run installs HAProxy and sets this: there a missing binary is a failure.
REQUIRED = os.environ.get("SSE_TEST_PROXIES_REQUIRED") == "1"
PARTITIONS = 4
USERID = "path,field(4,/),lower"
CONFIGURATION = """\
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend partitions
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain lf-string \
"%[{userid},crc32] %[{userid},crc32,mod({partitions})] %[{shipped}]"
"""


def _haproxy() -> str:
    found = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        reason = "haproxy is not installed (apt-get install haproxy; .ci/run does)"
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def shipped_partition_expression() -> str:
    """The sample expression deploy/haproxy/haproxy-sharded.cfg routes by."""
    [expression] = re.findall(
        r"^\s*http-request set-var\(txn\.partition\) (\S+) if subscribe$",
        SHARDED_EDGE.read_text(),
        re.M,
    )
    return expression


@pytest.fixture
def haproxy_port(tmp_path: Path) -> Iterator[int]:
    """A real HAProxy answering each request with the CRC-32 of the path's userid segment
    and that modulo 4, then the partition the shipped sharded edge computes."""
    port = free_port()
    configuration = tmp_path / "haproxy.cfg"
    configuration.write_text(
        CONFIGURATION.format(
            port=port,
            userid=USERID,
            partitions=PARTITIONS,
            shipped=shipped_partition_expression(),
        )
    )
    process = subprocess.Popen(
        [_haproxy(), "-db", "-f", str(configuration)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    output = process.stdout.read() if process.stdout else b""
                    pytest.fail(f"haproxy did not listen: {output.decode(errors='replace')}")
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def test_haproxys_crc32_of_the_lowercase_userid_is_zlibs_and_gives_the_same_partition(
    haproxy_port: int,
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", haproxy_port, timeout=10)
    compared = 0
    for number in range(2000):
        userid = str(uuid.uuid4())
        # Some as a browser might send them, upper case: the edge lowers them too.
        sent = userid.upper() if number % 3 == 0 else userid
        connection.request("GET", f"/subscribe/{uuid.uuid4()}/{sent}/{uuid.uuid4()}")
        response = connection.getresponse()
        assert response.status == 200
        crc, partition, _ = (int(value) for value in response.read().split())
        assert crc == zlib.crc32(userid.encode("ascii")), userid
        assert partition == partition_of(sent, PARTITIONS), userid
        compared += 1
    connection.close()
    assert compared == 2000


def test_the_shipped_sharded_edge_routes_by_the_partition_the_server_computes(
    haproxy_port: int,
) -> None:
    expression = shipped_partition_expression()
    assert expression.endswith(f",lower,crc32,mod({PARTITIONS})")
    connection = http.client.HTTPConnection("127.0.0.1", haproxy_port, timeout=10)
    for number in range(500):
        userid = str(uuid.uuid4())
        # As a client may send it: upper case, or with a character percent-encoded (the
        # server splits the path at its slashes, then decodes each segment).
        sent = userid.upper() if number % 2 else userid
        if number % 5 == 0:
            sent = "%" + sent[0].encode().hex().upper() + sent[1:]
        connection.request("GET", f"/subscribe/{uuid.uuid4()}/{sent}/{uuid.uuid4()}")
        response = connection.getresponse()
        assert response.status == 200
        *_, partition = (int(value) for value in response.read().split())
        assert partition == partition_of(userid, PARTITIONS), sent
    connection.close()
