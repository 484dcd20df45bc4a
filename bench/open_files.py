"""Streams a server holds when started with a shell's soft open-file limit (issue 14 item 4).

``python -m bench.open_files --streams 10000 --soft-limit 1024`` starts ``twistd`` with that
soft limit (the hard limit as this machine has it), opens the streams over HTTP/1.1 (one
connection each) and prints how many were established and what the server warned.
``--source DIR`` runs another tree (a checkout of main, say) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from .clients import EventSink, Fleet, Subscription
from .environment import ServerProcess, environment, raise_file_limit

_STREAMS_PER_USER = 10


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.open_files", description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--soft-limit", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--source", type=Path, help="a tree to run instead of the installed one")
    return parser.parse_args()


async def _run(options: argparse.Namespace) -> dict[str, object]:
    users = -(-options.streams // _STREAMS_PER_USER)
    with environment(users) as bench:
        server = ServerProcess(
            bench,
            "open-files",
            source=options.source,
            soft_file_limit=options.soft_limit,
            extra_environ={
                "SSE_MAX_STREAMS_PER_USER": str(_STREAMS_PER_USER),
                # Every stream comes from 127.0.0.1: let all its handshakes be checked.
                "SSE_MAX_AUTH_CHECKS_PER_CLIENT": str(options.concurrency),
            },
        )
        await server.start()
        fleet = Fleet(server.port, bench.ca_file, EventSink())
        try:
            subscriptions = [
                Subscription(n % users, bench.subscribe_path(n % users))
                for n in range(options.streams)
            ]
            opened = await fleet.open_http1(subscriptions, options.concurrency)
            await asyncio.sleep(2)  # the burst warning comes after a quiet second
            problems = server.problems()
            limit_lines = [
                line["message"]
                for line in server.log_lines
                if str(line.get("message", "")).startswith(("open-file limit", "cannot raise"))
            ]
            emfile_lines = sum(
                "EMFILE recovery" in str(line.get("message", "")) for line in server.log_lines
            )
        finally:
            fleet.close_all()
            await server.stop()
    return {
        "soft_limit": options.soft_limit,
        "requested": opened.requested,
        "established": opened.established,
        "failures": opened.failures,
        "failure_reasons": opened.failure_reasons,
        "seconds": round(opened.seconds, 1),
        "start_up": limit_lines,
        "warnings_after_ready": problems[:5],
        "emfile_recovery_lines": emfile_lines,
    }


def main() -> None:
    """Run once and print the result as JSON."""
    raise_file_limit()
    print(json.dumps(asyncio.run(_run(_arguments())), indent=2))


if __name__ == "__main__":
    main()
