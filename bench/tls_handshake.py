"""``python -m bench.tls_handshake``: server CPU per TLS connection, new and resumed.

The server's own TLS connection creator (``ReloadableServerTLS``, the dev certificates) on a
port of a child process whose protocol writes one line; one Python ``ssl`` client context
connects ``--connections`` times with no session (a full handshake), then as many times with
the session of its first connection (resumed, when the server issues tickets). Server CPU
comes from ``/proc``. TLS only: no HTTP request, no auth query (bench S4 has those).
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from sse_twisted.devcerts import ensure_dev_certificates

_GREETING = b"hello\n"

_SERVER = """
import sys
from pathlib import Path
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from sse_twisted._tls_reload import ReloadableServerTLS

class Greeter(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\\n")

def bound(port):
    print(port.getHost().port, flush=True)

tls = ReloadableServerTLS(Path(sys.argv[1]), reactor)
endpoint = SSL4ServerEndpoint(reactor, 0, tls, interface="127.0.0.1")
endpoint.listen(Factory.forProtocol(Greeter)).addCallback(bound)
reactor.run()
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connect(
    port: int, context: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLSession | None, bool]:
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname="localhost", session=session) as connection,
    ):
        connection.recv(len(_GREETING))
        return connection.session, connection.session_reused


def measure(server_pid: int, port: int, ca: Path, version: ssl.TLSVersion, count: int) -> str:
    """One line: server CPU per full and per resumed handshake in ``version``."""
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = context.maximum_version = version
    session, _ = _connect(port, context)
    start = _cpu_seconds(server_pid)
    for _ in range(count):
        _connect(port, context)
    full = (_cpu_seconds(server_pid) - start) / count
    start = _cpu_seconds(server_pid)
    resumed = sum(_connect(port, context, session)[1] for _ in range(count))
    again = (_cpu_seconds(server_pid) - start) / count
    return (
        f"{version.name}: server CPU per full handshake {full * 1e3:.3f} ms, "
        f"per reconnect with the session {again * 1e3:.3f} ms ({resumed}/{count} resumed)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_handshake", description=__doc__)
    parser.add_argument("--connections", type=int, default=1000, help="per figure")
    options = parser.parse_args()
    certs = Path(tempfile.mkdtemp(prefix="sse-bench-tls-"))
    ensure_dev_certificates(certs)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(certs)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            print(measure(server.pid, port, certs / "dev_ca.pem", version, options.connections))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
