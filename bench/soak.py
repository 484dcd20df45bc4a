"""Soak: thousands of stream connects and disconnects against a real ``twistd`` server, with
its RSS and open file descriptors (from ``/proc/<pid>``) at the start, the peak and the end.

Each worker loops: open a TLS connection, ``GET`` a subscribe path, read the head of the
stream, then leave — politely (close), rudely (TCP reset, no TLS close), or with a wrong
token (``403``). ``python -m bench.soak --help``; ``make soak`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from bench.environment import ServerProcess, environment, raise_file_limit, sample


@dataclass
class Figures:
    """RSS (KiB) and open descriptors of the server at one moment."""

    rss_kib: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> Figures:
        return cls(sample(pid).rss_kib, len(os.listdir(f"/proc/{pid}/fd")))


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    peak: Figures = field(default_factory=lambda: Figures(0, 0))
    timeline: list[Figures] = field(default_factory=list)


async def _one_cycle(
    port: int, context: ssl.SSLContext, path: bytes, how: str, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = head.split(b" ", 2)[1].decode()
        if status == "200":
            await asyncio.wait_for(reader.readuntil(b": connected\n"), 10)
        tally.outcomes[f"{how} {status}"] += 1
    finally:
        if how == "reset":
            sock = writer.get_extra_info("socket")
            # SO_LINGER 0: close() sends RST, as a crashed client or dropped network does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.wait_closed()


async def _worker(
    port: int, context: ssl.SSLContext, paths: list[bytes], bad: bytes, until: float, tally: Tally
) -> None:
    randomness = random.Random()
    while time.monotonic() < until:
        draw = randomness.random()
        how = "close" if draw < 0.75 else "reset" if draw < 0.9 else "forbidden"
        path = bad if how == "forbidden" else randomness.choice(paths)
        try:
            await _one_cycle(port, context, path, how, tally)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as error:
            tally.outcomes[f"error {type(error).__name__}"] += 1


async def _watch(pid: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        now = Figures.of(pid)
        tally.peak = Figures(max(tally.peak.rss_kib, now.rss_kib), max(tally.peak.fds, now.fds))
        tally.timeline.append(now)
        await asyncio.sleep(0.25)


async def soak(seconds: float, workers: int, users: int) -> int:
    raise_file_limit()
    with environment(users) as bench:
        server = ServerProcess(bench, "soak")
        await server.start()
        try:
            context = ssl.create_default_context(cafile=str(bench.ca_file))
            paths = [bench.subscribe_path(user) for user in range(users)]
            bad = f"/subscribe/{bench.userids[0]}/{bench.userids[0]}/{bench.userids[1]}".encode()
            # A first round warms every code path (and the auth cache) before the baseline.
            tally = Tally()
            await _worker(server.port, context, paths, bad, time.monotonic() + 2, tally)
            await asyncio.sleep(1)
            start = Figures.of(server.pid)
            tally = Tally(peak=start)
            until = time.monotonic() + seconds
            began = time.monotonic()
            await asyncio.gather(
                _watch(server.pid, until, tally),
                *(_worker(server.port, context, paths, bad, until, tally) for _ in range(workers)),
            )
            elapsed = time.monotonic() - began
            await asyncio.sleep(3)  # the server sees the last disconnects
            end = Figures.of(server.pid)
            cycles = sum(tally.outcomes.values())
            errors = sum(n for name, n in tally.outcomes.items() if name.startswith("error"))
            problems = server.problems()
            print(f"soak: {cycles} connect/disconnect cycles in {elapsed:.0f}s, {workers} workers")
            for name, count in sorted(tally.outcomes.items()):
                print(f"  {name}: {count}")
            print(f"  RSS KiB  start {start.rss_kib}  peak {tally.peak.rss_kib}  end {end.rss_kib}")
            tenths = [tally.timeline[len(tally.timeline) * n // 10] for n in range(10)]
            print("  RSS KiB by tenth of the run: " + " ".join(str(f.rss_kib) for f in tenths))
            print(f"  open fds start {start.fds}  peak {tally.peak.fds}  end {end.fds}")
            print(f"  server warnings/errors logged: {len(problems)}")
            for problem in problems[:10]:
                print(f"    {problem}")
            alive = server.process is not None and server.process.returncode is None
            print(f"  server still running: {alive}")
            leaked_fds = end.fds - start.fds
            # RSS may settle a little above the warm baseline (allocator arenas); fds may not.
            ok = alive and errors == 0 and not problems and leaked_fds <= 2
            print(f"soak: {'PASS' if ok else 'FAIL'} (fds end-start {leaked_fds:+d})")
            return 0 if ok else 1
        finally:
            await server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180, help="soak duration")
    parser.add_argument("--workers", type=int, default=50, help="concurrent clients")
    parser.add_argument("--users", type=int, default=200, help="subscribers in the database")
    arguments = parser.parse_args()
    return asyncio.run(soak(arguments.seconds, arguments.workers, arguments.users))


if __name__ == "__main__":
    sys.exit(main())
