"""Soak: thousands of stream connects and disconnects against a real ``twistd`` server, in
two halves, with the server's RSS (as is and after ``malloc_trim``), live objects and open
descriptors measured by the server itself when quiet: at the start, after each half.

It fails on a client error, a server warning, a descriptor not given back, or trimmed RSS
still growing over the second half (a leak); RSS that rises in the first half and then stays
is the allocator keeping freed pages (see the README).

Each worker loops: open a TLS connection, ``GET`` a subscribe path, read the head of the
stream, then leave — politely (close), rudely (TCP reset, no TLS close), or with a wrong
token (``403``). ``python -m bench.soak --help``; ``make soak`` runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.environment import ServerProcess, environment, raise_file_limit, sample

_PROBE = Path(__file__).parent / "soak_probe"
# A leak of one connection's objects costs kilobytes a cycle; the allocator's settling, a
# few bytes. Past this much trimmed RSS per cycle over the second half, the soak fails.
_LEAK_BYTES_PER_CYCLE = 100


@dataclass
class Figures:
    """The server at one quiet moment: RSS as is and after malloc_trim (KiB), objects the
    garbage collector tracks, and open descriptors."""

    rss_kib: int
    trimmed_rss_kib: int
    objects: int
    fds: int


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    peak_rss_kib: int = 0
    peak_fds: int = 0

    @property
    def cycles(self) -> int:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> int:
        return sum(n for name, n in self.outcomes.items() if name.startswith("error"))


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
        tally.peak_rss_kib = max(tally.peak_rss_kib, sample(pid).rss_kib)
        tally.peak_fds = max(tally.peak_fds, len(os.listdir(f"/proc/{pid}/fd")))
        await asyncio.sleep(0.25)


async def _probe(server: ServerProcess, probe_file: Path) -> Figures:
    """Let the last disconnects land, then have the server measure itself."""
    await asyncio.sleep(3)
    answered = len(probe_file.read_text().splitlines()) if probe_file.exists() else 0
    os.kill(server.pid, signal.SIGUSR2)
    while not probe_file.exists() or len(probe_file.read_text().splitlines()) == answered:
        await asyncio.sleep(0.1)
    figures = json.loads(probe_file.read_text().splitlines()[-1])
    return Figures(fds=len(os.listdir(f"/proc/{server.pid}/fd")), **figures)


def _report(moments: list[tuple[str, Figures]], tally: Tally) -> None:
    print("                          RSS KiB  after trim    objects  open fds")
    for name, figures in moments:
        print(
            f"  {name:<22} {figures.rss_kib:>9} {figures.trimmed_rss_kib:>11}"
            f" {figures.objects:>10} {figures.fds:>9}"
        )
    peak = f"{tally.peak_rss_kib:>9} {'':>11} {'':>10} {tally.peak_fds:>9}"
    print(f"  {'peak while running':<22} {peak}")


async def soak(seconds: float, workers: int, users: int) -> int:
    raise_file_limit()
    with environment(users) as bench:
        probe_file = bench.directory / "soak-probe.jsonl"
        server = ServerProcess(
            bench,
            "soak",
            extra_environ={"PYTHONPATH": str(_PROBE), "SSE_SOAK_PROBE_FILE": str(probe_file)},
        )
        await server.start()
        try:
            context = ssl.create_default_context(cafile=str(bench.ca_file))
            paths = [bench.subscribe_path(user) for user in range(users)]
            bad = f"/subscribe/{bench.userids[0]}/{bench.userids[0]}/{bench.userids[1]}".encode()
            # A first round warms every code path (and the auth cache) before the baseline.
            await _worker(server.port, context, paths, bad, time.monotonic() + 2, Tally())
            moments = [("start (warmed up)", await _probe(server, probe_file))]
            tally = Tally()
            halves: list[int] = []
            began = time.monotonic()
            for half in ("after first half", "after second half"):
                before = tally.cycles
                until = time.monotonic() + seconds / 2
                await asyncio.gather(
                    _watch(server.pid, until, tally),
                    *(
                        _worker(server.port, context, paths, bad, until, tally)
                        for _ in range(workers)
                    ),
                )
                halves.append(tally.cycles - before)
                moments.append((half, await _probe(server, probe_file)))
            elapsed = time.monotonic() - began
            problems = server.problems()
            cycles = f"{tally.cycles} connect/disconnect cycles"
            print(f"soak: {cycles} in {elapsed:.0f}s, {workers} clients")
            for name, count in sorted(tally.outcomes.items()):
                print(f"  {name}: {count}")
            _report(moments, tally)
            start, middle, end = (figures for _, figures in moments)
            growth = (end.trimmed_rss_kib - middle.trimmed_rss_kib) * 1024 / halves[1]
            print(
                f"  second half: trimmed RSS {end.trimmed_rss_kib - middle.trimmed_rss_kib:+d} KiB"
                f" over {halves[1]} cycles ({growth:+.1f} bytes a cycle; a leak >="
                f" {_LEAK_BYTES_PER_CYCLE}), objects {end.objects - middle.objects:+d}"
            )
            print(f"  server warnings/errors logged: {len(problems)}")
            for problem in problems[:10]:
                print(f"    {problem}")
            alive = server.process is not None and server.process.returncode is None
            print(f"  server still running: {alive}")
            leaked_fds = end.fds - start.fds
            ok = (
                alive
                and tally.errors == 0
                and not problems
                and leaked_fds <= 0
                and growth < _LEAK_BYTES_PER_CYCLE
            )
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
