"""The scenarios: S1 idle capacity, S2 throughput, S3 latency, S4 connect storm (and S4r, TLS
session resumption), S5 HTTP/2 and the bare-consumer ceiling. Each starts what it needs,
measures, stops it, and returns a dict. ``Settings.server`` says which server: sse-twisted or
the reference server (``bench/reference``); ``SSE_TWISTED_ONLY`` names what only the former
can run.

Server CPU is utime + stime of the server process (twistd or uvicorn) over the scenario's
measured window (``/proc/<pid>/stat``, 10 ms ticks), memory its VmRSS; the generator's CPU
(this process) and the broker's (beam.smp) over the same window are reported beside it, so
that a saturated generator or broker is visible.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .clients import (
    EventSink,
    Fleet,
    OpenResult,
    SequentialConnects,
    Subscription,
    client_tls_context,
    connect_one_by_one,
)
from .environment import (
    REPOSITORY,
    SSE_TWISTED,
    BenchEnvironment,
    ServerProcess,
    broker_pid,
    sample,
    server_process,
)
from .fleet import fleet
from .ingest import ingest
from .profiling import Profiler

__all__ = ["SSE_TWISTED_ONLY", "Settings", "run_scenario"]


@dataclass(frozen=True)
class Settings:
    """Sizes of the scenarios (the issue's by default)."""

    levels: tuple[int, ...] = (1000, 5000, 10000)
    idle_seconds: float = 30.0
    throughput_streams: int = 1000
    throughput_messages: int = 20000
    latency_streams: int = 1000
    latency_rate: float = 500.0
    latency_seconds: float = 15.0
    latency_idle_streams: int = 10000
    stalled_streams: int = 10
    storm_connections: int = 2000
    storm_timeout: float = 30.0
    resume_connections: int = 500
    streams_per_h2_connection: int = 100
    open_concurrency: int = 100
    fleet_rate: float = 4000.0
    fleet_seconds: float = 10.0
    source: Path | None = None
    server_environ: tuple[tuple[str, str], ...] = ()
    server: str = SSE_TWISTED

    @property
    def users(self) -> int:
        """How many users the database needs."""
        return max(
            *self.levels,
            self.storm_connections,
            self.latency_streams + 1 + self.latency_idle_streams,
            2 * self.resume_connections,
            100,
        )


class Meter:
    """CPU of the server, the generator and the broker, and wall time, over a window."""

    def __init__(self, server: ServerProcess) -> None:
        self._server = server
        self._broker = broker_pid()

    def _now(self) -> tuple[float, float, float, float]:
        broker = sample(self._broker).cpu_seconds if self._broker else 0.0
        return (
            time.monotonic(),
            self._server.sample().cpu_seconds,
            sum(os.times()[:2]),
            broker,
        )

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> dict[str, float]:
        end = self._now()
        seconds, server, generator, broker = (b - a for a, b in zip(self._start, end, strict=True))
        return {
            "seconds": round(seconds, 3),
            "server_cpu_seconds": round(server, 3),
            "generator_cpu_seconds": round(generator, 3),
            "broker_cpu_seconds": round(broker, 3),
        }


def _percentile(ordered: list[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _opened(result: OpenResult) -> dict[str, Any]:
    return {
        "requested": result.requested,
        "established": result.established,
        "failures": result.failures,
        "failure_reasons": result.failure_reasons,
        "seconds": round(result.seconds, 3),
    }


async def _python_module(module: str, *arguments: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *arguments,
        cwd=REPOSITORY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _publish(queue: str, users: Path, count: int, *extra: str) -> dict[str, Any]:
    process = await _python_module(
        "bench.publisher", "--queue", queue, "--users", str(users), "--count", str(count), *extra
    )
    output, errors = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"publisher failed: {errors.decode()[-2000:]}")
    summary: dict[str, Any] = json.loads(output.splitlines()[-1])
    return summary


async def _wait_for_events(
    sink: EventSink, target: int, stall_seconds: float = 15.0, counted: Any = None
) -> None:
    """Until ``target`` events arrived or none came for ``stall_seconds``.

    Polls every 20 ms: the figures come from the sink's own timestamps, not from this loop.
    """
    count = counted or (lambda: sink.events)
    last_count, last_change = -1, time.monotonic()
    while count() < target:
        await asyncio.sleep(0.02)
        if count() != last_count:
            last_count, last_change = count(), time.monotonic()
        elif time.monotonic() - last_change > stall_seconds:
            return


class _Run:
    """One server with a fleet of streams against it, torn down however the scenario ends."""

    def __init__(
        self, environment: BenchEnvironment, settings: Settings, name: str, sink: EventSink
    ) -> None:
        self.environment = environment
        self.settings = settings
        self.server: ServerProcess = server_process(
            settings.server, environment, name, settings.source, dict(settings.server_environ)
        )
        self.sink = sink
        self.fleet: Fleet | None = None

    async def __aenter__(self) -> _Run:
        await self.server.start()
        self.fleet = Fleet(self.server.port, self.environment.ca_file, self.sink)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.fleet is not None:
            self.fleet.close_all()
        await self.server.stop()

    def subscriptions(self, first: int, last: int) -> list[Subscription]:
        return [
            Subscription(user, self.environment.subscribe_path(user)) for user in range(first, last)
        ]

    async def open(self, protocol: str, subscriptions: list[Subscription]) -> OpenResult:
        assert self.fleet is not None
        if protocol == "h2":
            per_connection = self.settings.streams_per_h2_connection
            return await self.fleet.open_http2(
                subscriptions,
                per_connection,
                concurrency=max(1, self.settings.open_concurrency // per_connection),
            )
        return await self.fleet.open_http1(subscriptions, self.settings.open_concurrency)

    def warnings(self) -> int:
        problems = self.server.problems()
        for message in sorted(set(problems))[:5]:
            print(f"bench: server {self.server.name} logged: {message}", file=sys.stderr)
        return len(problems)


async def idle_capacity(
    environment: BenchEnvironment, settings: Settings, protocol: str = "http/1.1"
) -> dict[str, Any]:
    """S1 (and S5 over h2): streams opened in steps; RSS and CPU per stream, idle heartbeats."""
    sink = EventSink()
    async with _Run(environment, settings, f"s1-{protocol.replace('/', '')}", sink) as run:
        # Warm-up: the first streams import and build what every later one reuses.
        warm = await run.open(protocol, run.subscriptions(0, 50))
        assert run.fleet is not None
        run.fleet.close_all()
        await asyncio.sleep(1.0)
        baseline = run.server.sample()
        meter = Meter(run.server)
        levels: list[dict[str, Any]] = []
        opened = 0
        for level in settings.levels:
            meter.start()
            result = await run.open(protocol, run.subscriptions(opened, level))
            cost = meter.stop()
            new = level - opened
            opened = level
            await asyncio.sleep(1.0)
            now = run.server.sample()
            levels.append(
                {
                    "streams": level,
                    "open": _opened(result),
                    "server_cpu_ms_per_connection": round(
                        1000 * cost["server_cpu_seconds"] / new, 3
                    ),
                    "generator_cpu_ms_per_connection": round(
                        1000 * cost["generator_cpu_seconds"] / new, 3
                    ),
                    "rss_kb": now.rss_kib,
                    "rss_per_stream_kb": round((now.rss_kib - baseline.rss_kib) / level, 2),
                }
            )
        comments = sink.comments
        meter.start()
        await asyncio.sleep(settings.idle_seconds)
        idle = meter.stop()
        streams = opened
        return {
            "scenario": "S1" if protocol != "h2" else "S5-idle",
            "protocol": protocol,
            "warm_up_failures": warm.failures,
            "baseline_rss_kb": baseline.rss_kib,
            "levels": levels,
            "idle": {
                "streams": streams,
                **idle,
                "server_cpu_percent": round(100 * idle["server_cpu_seconds"] / idle["seconds"], 2),
                "keep_alives_received": sink.comments - comments,
                "keep_alives_per_stream": round((sink.comments - comments) / max(streams, 1), 2),
            },
            "server_warnings": run.warnings(),
        }


async def throughput(
    environment: BenchEnvironment,
    settings: Settings,
    protocol: str = "http/1.1",
    profile: Path | None = None,
) -> dict[str, Any]:
    """S2 (and S5 over h2): flat-out unicast to 1,000 streams; deliveries/s and CPU each."""
    sink = EventSink(record_seq=True)
    streams = settings.throughput_streams
    messages = settings.throughput_messages
    async with _Run(environment, settings, f"s2-{protocol.replace('/', '')}", sink) as run:
        opened = await run.open(protocol, run.subscriptions(0, streams))
        users = environment.users_file(streams)
        profiler = Profiler(run.server.pid, profile) if profile else None
        if profiler:
            await profiler.start()
        await asyncio.sleep(0.5)
        meter = Meter(run.server)
        meter.start()
        published = await _publish(run.server.queue, users, messages)
        await _wait_for_events(sink, messages)
        cost = meter.stop()
        profiled = await profiler.stop() if profiler else None
        await asyncio.sleep(0.5)  # duplicates, if any, would arrive now
        seqs = [seq for _, seq in sink.seqs]
        unique = len(set(seqs) & set(range(messages)))
        misrouted = sum(1 for user, seq in sink.seqs if seq % streams != user)
        elapsed = sink.last_event_at - published["started"]
        result = {
            "scenario": "S2" if protocol != "h2" else "S5-throughput",
            "protocol": protocol,
            "streams": streams,
            "open": _opened(opened),
            "messages": messages,
            "delivered": len(seqs),
            "lost": messages - unique,
            "duplicated": len(seqs) - unique,
            "misrouted": misrouted,
            "deliveries_per_second": round(len(seqs) / elapsed, 1) if elapsed > 0 else 0,
            "publish_rate": round(published["publish_rate"], 1),
            "server_cpu_us_per_delivery": round(
                1e6 * cost["server_cpu_seconds"] / max(len(seqs), 1), 1
            ),
            "generator_cpu_us_per_delivery": round(
                1e6 * cost["generator_cpu_seconds"] / max(len(seqs), 1), 1
            ),
            "broker_cpu_us_per_delivery": round(
                1e6 * cost["broker_cpu_seconds"] / max(len(seqs), 1), 1
            ),
            "window": cost,
            "server_warnings": run.warnings(),
        }
        if profiled is not None:
            result["profile"] = profiled
        return result


async def latency(environment: BenchEnvironment, settings: Settings) -> dict[str, Any]:
    """S3: 500 messages/s to 1,000 streams; publish-to-receive latency, beside stalled clients,
    then again with ``latency_idle_streams`` idle streams open beside them.

    ``stalled_streams`` more streams, of one extra "hot" user, stop reading at once and get
    8 KB messages at 50/s: their data piles up in the server, which must not delay anyone
    (the server drops them during the first window, so the second has none). The idle
    streams belong to other users and get only keep-alives. Each window also reports the
    server's stall lines (a tick ``SSE_STALL_LOG_MS`` late) and what ran in them, and how
    its reactor-lag and collection histograms moved.
    """
    sink = EventSink(record_latency=True)
    streams = settings.latency_streams
    count = int(settings.latency_rate * settings.latency_seconds)
    metrics_port = _free_port()
    settings = replace(
        settings, server_environ=(("SSE_METRICS_PORT", str(metrics_port)), *settings.server_environ)
    )
    async with _Run(environment, settings, "s3", sink) as run:
        opened = await run.open("http/1.1", run.subscriptions(0, streams))
        hot_user = streams
        assert run.fleet is not None
        stalled = await run.fleet.open_http1(
            run.subscriptions(hot_user, hot_user + 1) * settings.stalled_streams,
            settings.open_concurrency,
            stalled=True,
        )
        users = environment.users_file(streams)

        async def window() -> dict[str, Any]:
            sink.latencies_ns.clear()
            await asyncio.sleep(0.5)
            before = run.server.sample()
            run.server.read_log()
            stalls_from = len(run.server.log_lines)
            histograms_before = await _stall_histograms(metrics_port)
            meter = Meter(run.server)
            meter.start()
            published = await _publish(
                run.server.queue,
                users,
                count,
                "--rate",
                str(settings.latency_rate),
                "--hot-user",
                environment.userids[hot_user],
                "--hot-rate",
                "50",
            )
            await _wait_for_events(
                sink, count, stall_seconds=5.0, counted=lambda: len(sink.latencies_ns)
            )
            cost = meter.stop()
            after = run.server.sample()
            ordered = sorted(value / 1e6 for value in sink.latencies_ns)
            run.server.read_log()
            return {
                "messages": count,
                "received": len(ordered),
                "lost": count - len(ordered),
                "hot_messages": published["hot_messages"],
                "latency_ms": {
                    "p50": round(_percentile(ordered, 0.50), 3),
                    "p90": round(_percentile(ordered, 0.90), 3),
                    "p99": round(_percentile(ordered, 0.99), 3),
                    "max": round(ordered[-1], 3) if ordered else float("nan"),
                },
                "server_cpu_percent": round(100 * cost["server_cpu_seconds"] / cost["seconds"], 1),
                "server_rss_growth_kb": after.rss_kib - before.rss_kib,
                "window": cost,
                "stalls": _stalls(run.server.log_lines[stalls_from:]),
                "histograms": _moved(histograms_before, await _stall_histograms(metrics_port)),
            }

        alone = await window()
        result: dict[str, Any] = {
            "scenario": "S3",
            "streams": streams,
            "open": _opened(opened),
            "stalled_streams": stalled.established,
            "rate": settings.latency_rate,
            **alone,
        }
        if settings.latency_idle_streams:
            first_idle = hot_user + 1
            last_idle = first_idle + settings.latency_idle_streams
            idle = await run.open("http/1.1", run.subscriptions(first_idle, last_idle))
            result["with_idle"] = {
                "idle_streams": settings.latency_idle_streams,
                "open": _opened(idle),
                **await window(),
            }
        result["server_warnings"] = run.warnings()
        return result


def _stalls(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """The server's stall lines of a window: how many, the longest, collections in them,
    and the three longest with what ran (their structured fields)."""
    stalls = [line for line in lines if "lag_ms" in line]
    longest = sorted(stalls, key=lambda line: line["lag_ms"], reverse=True)[:3]
    return {
        "count": len(stalls),
        "max_lag_ms": longest[0]["lag_ms"] if longest else 0.0,
        "with_collection": sum(1 for line in stalls if line.get("gc_collections")),
        "longest": [
            {key: value for key, value in line.items() if key not in _LOG_LINE_KEYS}
            for line in longest
        ],
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


_STALL_HISTOGRAMS = ("sse_reactor_lag_seconds", "sse_gc_pause_seconds")


async def _stall_histograms(port: int) -> dict[str, float]:
    """The server's lag and collection histogram samples; empty for a server without them."""

    def scrape() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    try:
        text = await asyncio.to_thread(scrape)
    except OSError:
        return {}
    return {
        " ".join([sample.name, *(f"{k}={v}" for k, v in sorted(sample.labels.items()))]): (
            sample.value
        )
        for family in text_string_to_metric_families(text)
        if family.name in _STALL_HISTOGRAMS
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The samples that moved in a window, by how much: counts per bucket, sums."""
    moved = {name: round(value - before.get(name, 0.0), 4) for name, value in after.items()}
    return {name: value for name, value in moved.items() if value}


_LOG_LINE_KEYS = frozenset({"message", "env", "index", "correlation_id", "logger", "@level"})


async def connect_storm(
    environment: BenchEnvironment, settings: Settings, profile: Path | None = None
) -> dict[str, Any]:
    """S4: 2,000 TLS connections opened at once; time to all established, CPU each."""
    sink = EventSink()
    connections = settings.storm_connections
    async with _Run(environment, settings, "s4", sink) as run:
        assert run.fleet is not None
        subscriptions = run.subscriptions(0, connections)
        profiler = Profiler(run.server.pid, profile) if profile else None
        if profiler:
            await profiler.start()
        meter = Meter(run.server)
        meter.start()
        result = await run.fleet.open_http1(
            subscriptions, concurrency=connections, timeout=settings.storm_timeout
        )
        cost = meter.stop()
        profiled = await profiler.stop() if profiler else None
        established = max(result.established, 1)
        storm = {
            "scenario": "S4",
            "connections": connections,
            "established": result.established,
            "failures": result.failures,
            "failure_reasons": result.failure_reasons,
            "seconds_to_all_established": round(result.seconds, 3),
            "server_cpu_ms_per_connection": round(
                1000 * cost["server_cpu_seconds"] / established, 3
            ),
            "generator_cpu_ms_per_connection": round(
                1000 * cost["generator_cpu_seconds"] / established, 3
            ),
            "window": cost,
            "server_warnings": run.warnings(),
        }
        if profiled is not None:
            storm["profile"] = profiled
        return storm


async def resumed_connects(environment: BenchEnvironment, settings: Settings) -> dict[str, Any]:
    """S4r: streams opened one by one with a full TLS handshake, then as many again, each
    offering the TLS session of one of the first (a browser reconnecting to the same server).

    Every stream is a different user, so that each connect costs its auth check (no grant
    cached); the first round's streams are closed before the second is measured.
    ``session_reused`` counts the connects whose session the server accepted: a server that
    issues no ticket, or ignores them, shows 0 and a full handshake's cost.
    """
    connections = settings.resume_connections
    async with _Run(environment, settings, "s4r", EventSink()) as run:
        context = client_tls_context(
            environment.ca_file, "http/1.1", os.environ.get("BENCH_VERIFY", "0") == "1"
        )
        rounds: dict[str, dict[str, Any]] = {}
        sessions: list[Any] = []
        for name, first in (("full", 0), ("resumed", connections)):
            paths = [environment.subscribe_path(user) for user in range(first, first + connections)]
            meter = Meter(run.server)
            meter.start()
            opened: SequentialConnects = await asyncio.to_thread(
                connect_one_by_one, run.server.port, context, paths, sessions
            )
            cost = meter.stop()
            established = len(opened.sockets)
            opened.close()
            rounds[name] = {
                "established": established,
                "failures": opened.failures,
                "failure_reasons": opened.failure_reasons,
                "session_reused": opened.session_reused,
                "sessions_with_ticket": opened.sessions_with_ticket,
                "server_cpu_ms_per_connection": round(
                    1000 * cost["server_cpu_seconds"] / max(established, 1), 3
                ),
                "ms_per_connection": round(1000 * cost["seconds"] / max(established, 1), 3),
                "window": cost,
            }
            sessions = opened.sessions
            await asyncio.sleep(0.5)  # the closed streams' clean-up, outside the next window
        return {
            "scenario": "S4r",
            "connections": connections,
            "full": rounds["full"],
            "resumed": rounds["resumed"],
            "server_warnings": run.warnings(),
        }


async def _bare_consumer(
    environment: BenchEnvironment, adapter: str, count: int, *publisher: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    queue = environment.new_queue()
    arguments = ["--queue", queue, "--count", str(count), "--adapter", adapter]
    if publisher:
        arguments.append("--latency")
    consumer = await _python_module("bench.ceiling", *arguments)
    assert consumer.stdout is not None
    try:
        ready = await asyncio.wait_for(consumer.stdout.readline(), 30)
        if not ready:
            raise RuntimeError("bare consumer ended before it was ready")
        users = environment.users_file(1000)
        published = await _publish(queue, users, count, *publisher)
        output = await asyncio.wait_for(consumer.stdout.readline(), 120)
        await consumer.wait()
    finally:
        if consumer.returncode is None:
            consumer.kill()
            await consumer.wait()
    return json.loads(output), published


async def ceiling(environment: BenchEnvironment, settings: Settings) -> dict[str, Any]:
    """The bare consumer, live-published to like S2: pika's own loop and its Twisted adapter;
    and the broker's own publish-to-consume latency at S3's pace."""
    messages = settings.throughput_messages
    adapters: dict[str, Any] = {}
    for adapter in ("select", "twisted"):
        consumed, published = await _bare_consumer(environment, adapter, messages)
        elapsed = consumed["last_at"] - published["started"]
        adapters[adapter] = {
            "received": consumed["received"],
            "messages_per_second": round(consumed["received"] / elapsed, 1),
            "cpu_us_per_message": round(1e6 * consumed["cpu_seconds"] / consumed["received"], 1),
        }
    paced = int(settings.latency_rate * min(settings.latency_seconds, 5.0))
    consumed, _ = await _bare_consumer(
        environment, "select", paced, "--rate", str(settings.latency_rate)
    )
    ordered = sorted(value / 1e6 for value in consumed["latencies_ns"])
    return {
        "scenario": "ceiling",
        "messages": messages,
        "select": adapters["select"],
        "twisted": adapters["twisted"],
        "broker_latency_ms": {
            "messages": len(ordered),
            "p50": round(_percentile(ordered, 0.50), 3),
            "p90": round(_percentile(ordered, 0.90), 3),
            "p99": round(_percentile(ordered, 0.99), 3),
            "max": round(ordered[-1], 3) if ordered else float("nan"),
        },
    }


SCENARIOS = {
    "ceiling": lambda environment, settings: ceiling(environment, settings),
    "s2": lambda environment, settings: throughput(environment, settings),
    "s5-throughput": lambda environment, settings: throughput(environment, settings, "h2"),
    "s3": lambda environment, settings: latency(environment, settings),
    "s4": lambda environment, settings: connect_storm(environment, settings),
    "s4r": lambda environment, settings: resumed_connects(environment, settings),
    "s1": lambda environment, settings: idle_capacity(environment, settings),
    "s5-idle": lambda environment, settings: idle_capacity(environment, settings, "h2"),
    "ingest": lambda environment, settings: ingest(environment, settings),
    "fleet": lambda environment, settings: fleet(environment, settings),
}

# The ceiling measures no server; uvicorn, which serves the reference, speaks no HTTP/2;
# the fleet needs the partitioned mode.
SSE_TWISTED_ONLY = frozenset({"ceiling", "ingest", "s5-throughput", "s5-idle", "fleet"})


async def run_scenario(
    name: str, environment: BenchEnvironment, settings: Settings
) -> dict[str, Any]:
    """Run the scenario called ``name`` (a key of ``SCENARIOS``)."""
    result: dict[str, Any] = await SCENARIOS[name](environment, settings)
    return result
