"""How long a stop takes with idle streams open: SIGTERM to a ``twistd`` holding ``--streams``
idle streams (HTTP/1.1, one connection each, or HTTP/2, 100 streams a connection), until the
process has exited.

.venv/bin/python -m bench.drain [--source DIR] [--streams 1000] [--protocol h1|h2]

Prints one JSON object: the seconds from SIGTERM to the process's exit, to the last stream's
end (its ``retry:`` and end) and to the last connection closed by the server, and the
``aborting N connections still open`` warning if the forced cut came. With ``--source`` the
server runs the tree in DIR (``sse_twisted/`` and ``twisted/``), e.g. the one before a
change: ``git archive COMMIT sse_twisted twisted | tar -x -C DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from pathlib import Path

from bench.clients import EventSink, Fleet, Subscription
from bench.environment import ServerProcess, environment, raise_file_limit

_STREAMS_PER_CONNECTION = 100


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.drain")
    parser.add_argument("--source", type=Path, help="run the server tree in this directory")
    parser.add_argument("--streams", type=int, default=1000, help="idle streams held open")
    parser.add_argument("--protocol", choices=("h1", "h2"), default="h1")
    return parser.parse_args()


def _stamped(future: asyncio.Future[None]) -> asyncio.Future[float]:
    """When ``future`` is done (``time.monotonic()``)."""
    stamp: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    future.add_done_callback(lambda _: stamp.set_result(time.monotonic()))
    return stamp


async def _run(options: argparse.Namespace) -> dict[str, object]:
    raise_file_limit()
    with environment(options.streams) as bench:
        server = ServerProcess(
            bench,
            "drain",
            source=options.source,
            # Every stream comes from 127.0.0.1, 100 at once on an HTTP/2 connection: the
            # limits on checks in flight would ask most of them to come back later.
            extra_environ={
                "SSE_MAX_AUTH_CHECKS_PER_CLIENT": str(options.streams),
                "SSE_MAX_PENDING_AUTH_CHECKS": str(options.streams),
            },
        )
        await server.start()
        fleet = Fleet(server.port, bench.ca_file, EventSink())
        subscriptions = [
            Subscription(user, bench.subscribe_path(user)) for user in range(options.streams)
        ]
        if options.protocol == "h1":
            opened = await fleet.open_http1(subscriptions, concurrency=50)
        else:
            opened = await fleet.open_http2(subscriptions, _STREAMS_PER_CONNECTION, concurrency=10)
        assert opened.established == options.streams, opened
        ends = [_stamped(stream.ended) for stream in fleet.streams]
        closes = [_stamped(lost) for lost in fleet.connections_lost]
        assert server.process is not None
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await server.process.wait()
        exited = time.monotonic() - started
        ended = [at - started for at in await asyncio.gather(*ends)]
        closed = [at - started for at in await asyncio.gather(*closes)]
        server.read_log()
        aborting = [
            line["message"]
            for line in server.log_lines
            if str(line.get("message", "")).startswith("aborting")
        ]
        fleet.close_all()
        return {
            "protocol": options.protocol,
            "streams": options.streams,
            "source": str(options.source or "working tree"),
            "exit_seconds": round(exited, 2),
            "last_stream_ended_seconds": round(max(ended), 2),
            "last_connection_closed_seconds": round(max(closed), 2),
            "aborting": aborting,
        }


def main() -> None:
    """Run once and print the figures as JSON."""
    print(json.dumps(asyncio.run(_run(_arguments()))))


if __name__ == "__main__":
    main()
