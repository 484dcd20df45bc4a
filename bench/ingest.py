"""Ingest: server CPU per consumed message that matches no stream open on this instance.

In a fleet every instance reads the whole stream, so this cost caps the fleet's message
rate whatever the number of instances. A server with a few open streams is sent
``MESSAGES`` messages for users with no stream there, then one for a user with a stream:
the stream is consumed in order, so once that one arrives every other was consumed. The
figure is the server's CPU (utime + stime) from before the first publish to that arrival,
per message.

Registered as the bench scenario ``ingest``; on its own, with py-spy's top costs::

    .venv/bin/python -m bench.ingest --runs 3 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from .clients import EventSink, Fleet, Subscription
from .environment import REPOSITORY, BenchEnvironment, ServerProcess, environment
from .profiling import Profiler

if TYPE_CHECKING:
    from .scenarios import Settings

__all__ = ["MESSAGES", "TARGET_US", "headline", "ingest"]

MESSAGES = 50_000
_STREAMS = 5
# Users the messages go to, none of them with a stream: each is a key of the replay window.
_OTHER_USERS = 1_000
TARGET_US = 20.0
"""The issue's target for L{ingest}'s figure."""


async def _publish(queue: str, users: Path, count: int) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.publisher",
        "--queue",
        queue,
        "--users",
        str(users),
        "--count",
        str(count),
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"publisher failed: {errors.decode()[-2000:]}")


async def ingest(
    bench: BenchEnvironment,
    settings: Settings | None = None,
    profile: Path | None = None,
    messages: int = MESSAGES,
    source: Path | None = None,
) -> dict[str, Any]:
    """Run the scenario once; ``profile`` records the server under py-spy to that file;
    ``source`` is a copy of the tree to run the server from (else ``settings``'s)."""
    sink = EventSink()
    server = ServerProcess(
        bench,
        "ingest",
        source or (settings.source if settings else None),
        dict(settings.server_environ) if settings else {},
    )
    await server.start()
    fleet = Fleet(server.port, bench.ca_file, sink)
    try:
        opened = await fleet.open_http1(
            [Subscription(user, bench.subscribe_path(user)) for user in range(_STREAMS)], _STREAMS
        )
        others = bench.users_file(_OTHER_USERS, start=_STREAMS)
        marker = bench.users_file(1)
        # The start-up read-back of the (empty) stream ends after about two seconds.
        await asyncio.sleep(2.5)
        profiler = Profiler(server.pid, profile) if profile else None
        if profiler:
            await profiler.start()
        before = server.sample()
        started = time.monotonic()
        await _publish(server.queue, others, messages)
        await _publish(server.queue, marker, 1)
        while sink.events < 1:
            if time.monotonic() - started > 120:
                raise RuntimeError("the marker message never arrived")
            await asyncio.sleep(0.01)
        after = server.sample()
        profiled = await profiler.stop() if profiler else None
        cpu = after.cpu_seconds - before.cpu_seconds
        result: dict[str, Any] = {
            "scenario": "ingest",
            "streams": opened.established,
            "messages": messages,
            "seconds": round(after.at - before.at, 3),
            "server_cpu_seconds": round(cpu, 3),
            "server_cpu_us_per_message": round(1e6 * cpu / messages, 1),
            "messages_per_second": round(messages / (after.at - before.at), 1),
            "rss_growth_kb": after.rss_kib - before.rss_kib,
            "server_warnings": len(server.problems()),
        }
        if profiled is not None:
            result["profile"] = profiled
        return result
    finally:
        fleet.close_all()
        await server.stop()


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The figures the bench's table and per-run lists show."""
    return {
        key: result[key]
        for key in ("server_cpu_us_per_message", "messages_per_second", "server_warnings")
    }


async def _main(options: argparse.Namespace) -> None:
    figures = []
    with environment(users=_STREAMS + _OTHER_USERS) as bench:
        for run in range(options.runs):
            result = await ingest(bench, messages=options.messages, source=options.source)
            figures.append(result["server_cpu_us_per_message"])
            print(json.dumps({"run": run + 1, **result}), flush=True)
        if options.profile:
            result = await ingest(
                bench,
                profile=options.profile_file,
                messages=options.messages,
                source=options.source,
            )
            print(json.dumps({"profile": result.pop("profile"), **result}, indent=1), flush=True)
    if figures:
        median = statistics.median(figures)
        print(json.dumps({"server_cpu_us_per_message": {"runs": figures, "median": median}}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--messages", type=int, default=MESSAGES)
    parser.add_argument("--profile", action="store_true", help="one more run under py-spy")
    parser.add_argument("--source", type=Path, help="a copy of the tree to run the server from")
    parser.add_argument(
        "--profile-file",
        type=Path,
        default=REPOSITORY / "build" / "bench" / "profiles" / "ingest.txt",
    )
    uvloop.run(_main(parser.parse_args()))
