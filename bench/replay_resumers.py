"""Memory a server holds for browsers that resume with ``Last-Event-ID: 0`` and never read.

One user has ``--megabytes`` of events in the replay window (100 KB each); ``--resumers``
TLS connections of that user resume from offset 0 with a 4 KiB receive buffer and never
read. Prints the server's RSS once the window is full and once the resumers are settled.

.venv/bin/python -m bench.replay_resumers [--source DIR] [--megabytes 25] [--resumers 16]

With ``--source`` the server runs the tree in DIR (``sse_twisted/`` and ``twisted/``), e.g.
the one before a change: ``git archive COMMIT sse_twisted twisted | tar -x -C DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import time
from pathlib import Path

import pika

from bench.environment import BenchEnvironment, ServerProcess, environment

_EVENT_PAD = 100_000


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_resumers")
    parser.add_argument("--source", type=Path, help="run the server tree in this directory")
    parser.add_argument("--megabytes", type=int, default=25, help="replay of the one user")
    parser.add_argument("--resumers", type=int, default=16, help="resumers that never read")
    return parser.parse_args()


def _connect(port: int, ca_file: Path, receive_buffer: int | None = None) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.set_alpn_protocols(["http/1.1"])
    raw = socket.socket()
    if receive_buffer is not None:
        # Before connecting, so that it also sizes the TCP window the server sees.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    return context.wrap_socket(raw, server_hostname="localhost")


def _subscribe(bench: BenchEnvironment, user: int, last_event_id: str | None) -> bytes:
    header = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
    path = bench.subscribe_path(user).decode("ascii")
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{header}\r\n".encode()


def _publish(queue: str, bodies: list[bytes]) -> None:
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for body in bodies:
            channel.basic_publish("", queue, body, mandatory=True)
    finally:
        connection.close()


def _read_until(connection: ssl.SSLSocket, marker: bytes) -> None:
    received = b""
    while marker not in received:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("the server ended the stream")
        received = received[-len(marker) :] + chunk


def _message(userid: str, **extra: object) -> bytes:
    message = {"type": "foundcontract", "userid": userid, "filename": "r.pdf", "filepath": "/r.pdf"}
    return json.dumps({**message, "finished": False, **extra}).encode()


async def _settled_rss(server: ServerProcess, seconds: float = 3.0, limit: float = 30.0) -> int:
    """The server's RSS (KiB) once it has not grown for ``seconds``."""
    started = time.monotonic()
    highest, since = server.sample().rss_kib, time.monotonic()
    while time.monotonic() - since < seconds and time.monotonic() - started < limit:
        await asyncio.sleep(0.25)
        rss = server.sample().rss_kib
        if rss > highest:
            highest, since = rss, time.monotonic()
    return highest


async def _run(options: argparse.Namespace) -> dict[str, object]:
    with environment(users=2) as bench:
        server = ServerProcess(bench, "replay", source=options.source)
        await server.start()
        try:
            watcher = _connect(server.port, bench.ca_file)
            watcher.sendall(_subscribe(bench, 1, None))
            alice, bob = bench.userids
            events = options.megabytes * 1_000_000 // _EVENT_PAD
            # Offset 0 first, then the replay, then a marker for another user: once it
            # arrives, the replay is in the window.
            bodies = [_message(alice, n="first")]
            bodies += [_message(alice, n=n, pad="p" * _EVENT_PAD) for n in range(events)]
            bodies.append(_message(bob, n="marker"))
            await asyncio.to_thread(_publish, server.queue, bodies)
            await asyncio.to_thread(_read_until, watcher, b'"marker"')
            window_full = await _settled_rss(server)
            resumers = []
            for _ in range(options.resumers):
                connection = _connect(server.port, bench.ca_file, receive_buffer=4096)
                connection.sendall(_subscribe(bench, 0, "0"))
                resumers.append(connection)
            with_resumers = await _settled_rss(server)
            for connection in resumers:
                connection.close()
            watcher.close()
        finally:
            await server.stop()
    return {
        "source": str(options.source or "working tree"),
        "replay_megabytes": options.megabytes,
        "resumers": options.resumers,
        "rss_window_full_mib": round(window_full / 1024, 1),
        "rss_with_resumers_mib": round(with_resumers / 1024, 1),
        "growth_mib": round((with_resumers - window_full) / 1024, 1),
        "growth_per_resumer_kib": round((with_resumers - window_full) / options.resumers),
    }


def main() -> None:
    """Run once and print the result as one JSON line."""
    print(json.dumps(asyncio.run(_run(_arguments()))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
