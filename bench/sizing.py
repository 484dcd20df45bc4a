"""Sizing on paper (issue 13): instances, shards, partitions and RabbitMQ's load for 100,000
to 10,000,000 open streams, computed from measured figures.

    .venv/bin/python -m bench.sizing build/bench/results.json [more results files]

Each figure is taken from the newest results file that has it (``make bench`` writes
``build/bench/results.json``): memory per idle stream and heartbeat CPU (S1 at its top
level), server CPU per delivery (S2), per connect (S4), per ingested message that matches
no stream and the broker's CPU per message (the fleet scenario, one shard). A figure no file
has falls back to the 54c1746 run of ``bench/RESULTS.md`` (the fleet's have no fallback).
Prints the figures, the assumptions and a markdown table.

The model, per instance of ``n`` streams, each stream getting ``r`` messages a minute, one
stream per user, ``k`` instances per shard (every instance of a shard reads all of the
shard's messages, and delivers those of its own streams), each instance one core:

* CPU: ``n x heartbeat`` + ``n*r/60 x delivery`` + ``(k - 1)*n*r/60 x ingest`` (the messages
  of its shard's other instances' streams);
* memory and CPU must hold after one instance of each shard is lost: its streams move to
  the ``k - 1`` others, which then carry ``k / (k - 1)`` times their streams and deliveries
  (and ingest fewer unmatched messages), within the usable share of the core and the memory
  budget;
* a reconnect storm: all ``n`` streams of an instance back within ``storm_seconds`` at
  ``usable / connect`` connects a second.

The smallest ``n`` wins (that resource runs out first); ``P`` = shards, the least.
RabbitMQ takes ``N*r/60`` messages/s in and sends ``k`` times as many to consumers.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Assumptions", "Figures", "Size", "figures", "markdown", "size"]

SIZES = (100_000, 1_000_000, 10_000_000)
RATES = (1.0, 10.0)

# bench/RESULTS.md, "54c1746: sse-twisted beside the reference server", one run under load.
_FALLBACK = {
    "memory_kb_per_stream": (36.77, "S1 at 10,000 streams, 54c1746"),
    "heartbeat_cores_per_stream": (0.0253 / 10_000, "S1 idle at 10,000 streams, 54c1746"),
    "delivery_us": (111.0, "S2, 54c1746"),
    "connect_ms": (1.045, "S4, 54c1746"),
}


@dataclass(frozen=True)
class Figures:
    """The measured costs the table is computed from, and where each came from."""

    memory_kb_per_stream: float
    heartbeat_cores_per_stream: float
    delivery_us: float
    ingest_us: float
    connect_ms: float
    broker_us_per_message: float
    sources: dict[str, str]


@dataclass(frozen=True)
class Assumptions:
    """What the table assumes of the deployment."""

    cpu_usable: float = 0.7  # of the instance's one core: 30 % headroom
    stream_memory_mib: float = 1536.0  # of a 2 GiB instance, the rest for the process
    storm_seconds: float = 60.0  # every stream of an instance back within this
    instances_per_shard: int = 2  # so that losing one is a reconnect, not an outage
    wire_bytes_per_message: int = 400  # a 200-byte message and its AMQP frames
    broker_usable_cores: float = 16.8  # a 3-node cluster of 8 cores each, 70 % of them


@dataclass(frozen=True)
class Size:
    """One row: a fleet for ``streams`` streams at ``per_minute`` messages each a minute."""

    streams: int
    per_minute: float
    instances: int
    shards: int
    partitions: int
    streams_per_instance: int
    memory_share: float
    cpu_share: float
    cpu_after_loss_share: float
    delivery_cpu_share: float
    ingest_cpu_share: float
    heartbeat_cpu_share: float
    connect_share: float
    messages_in: float
    messages_out: float
    bytes_out: float
    broker_cores: float
    first_to_run_out: str


def _newest(reports: list[dict[str, Any]], scenario: str) -> dict[str, Any] | None:
    for report in reversed(reports):
        result = report.get("scenarios", {}).get(scenario)
        if result:
            found: dict[str, Any] = result
            return found
    return None


def _ingest_us(fleet: dict[str, Any], delivery_us: float) -> tuple[float, str]:
    """The one-shard instance's CPU per consumed message, less its deliveries at S2's cost:
    what a message that matches no stream costs."""
    one = fleet["shardings"][0]["instances"][0]
    cpu_us = one["cpu_us_per_consumed_message"] * one["consumed_messages"]
    unmatched = one["consumed_messages"] - one["deliveries"]
    ingest = (cpu_us - one["deliveries"] * delivery_us) / unmatched
    return ingest, (
        f"fleet, 1 shard: ({one['cpu_us_per_consumed_message']} µs x "
        f"{one['consumed_messages']} consumed - {one['deliveries']} deliveries x "
        f"{delivery_us} µs) / {unmatched} unmatched"
    )


def figures(reports: list[dict[str, Any]]) -> Figures:
    """The figures of the newest reports that have them (see the module's docstring)."""
    values = {name: value for name, (value, _) in _FALLBACK.items()}
    sources = {name: source for name, (_, source) in _FALLBACK.items()}
    idle = _newest(reports, "s1")
    if idle:
        top = idle["levels"][-1]
        values["memory_kb_per_stream"] = top["rss_per_stream_kb"]
        values["heartbeat_cores_per_stream"] = (
            idle["idle"]["server_cpu_percent"] / 100 / top["streams"]
        )
        sources["memory_kb_per_stream"] = f"S1 at {top['streams']} streams"
        sources["heartbeat_cores_per_stream"] = f"S1 idle at {top['streams']} streams"
    throughput = _newest(reports, "s2")
    if throughput:
        values["delivery_us"] = throughput["server_cpu_us_per_delivery"]
        sources["delivery_us"] = "S2"
    storm = _newest(reports, "s4")
    if storm:
        values["connect_ms"] = storm["server_cpu_ms_per_connection"]
        sources["connect_ms"] = "S4"
    fleet = _newest(reports, "fleet")
    if fleet is None:
        raise SystemExit("bench.sizing: no fleet scenario in the results given")
    values["ingest_us"], sources["ingest_us"] = _ingest_us(fleet, values["delivery_us"])
    one_shard = fleet["shardings"][0]
    values["broker_us_per_message"] = one_shard["broker_net_cpu_us_per_fleet_message"]
    sources["broker_us_per_message"] = (
        f"fleet, 1 shard: the shared broker's CPU per fleet message (one read each), less its "
        f"CPU while the fleet was idle ({one_shard['broker_background_cpu_percent']} % of a core): "
        f"an indication"
    )
    return Figures(**values, sources=sources)


def _cores(streams: float, shard_messages: float, per_stream_rate: float, m: Figures) -> float:
    """An instance's CPU (cores) with ``streams`` streams in a shard taking
    ``shard_messages`` a second: heartbeats, deliveries, and the shard's other messages."""
    own = streams * per_stream_rate
    return (
        streams * m.heartbeat_cores_per_stream
        + own * m.delivery_us / 1e6
        + (shard_messages - own) * m.ingest_us / 1e6
    )


def size(streams: int, per_minute: float, measured: Figures, assume: Assumptions) -> Size:
    """The fleet for ``streams`` open streams at ``per_minute`` messages each a minute.

    Memory and CPU must hold with one instance of every shard lost (its streams moved to
    the ``k - 1`` others of its shard, which take ``k / (k - 1)`` times their streams);
    the storm is every stream of an instance back within ``storm_seconds``.
    """
    k = assume.instances_per_shard
    if k < 2:
        raise ValueError("sizing assumes at least 2 instances per shard")
    failover = k / (k - 1)
    rate = per_minute / 60
    # Per stream of an instance in normal times: its shard takes k times its own messages.
    per_stream_after_loss = _cores(failover, k * rate, rate, measured)
    connects_per_second = assume.cpu_usable / (measured.connect_ms / 1e3)
    limits = {
        "instance memory": assume.stream_memory_mib
        * 1024
        / measured.memory_kb_per_stream
        / failover,
        "instance CPU": assume.cpu_usable / per_stream_after_loss,
        "connects per second (reconnect storm)": connects_per_second * assume.storm_seconds,
    }
    first = min(limits, key=lambda name: limits[name])
    shards = max(1, math.ceil(streams / (limits[first] * k)))
    instances = shards * k
    n = streams / instances
    messages_in = streams * rate
    messages_out = messages_in * k
    broker_cores = messages_out * measured.broker_us_per_message / 1e6
    delivery = n * rate * measured.delivery_us / 1e6
    ingest = (k - 1) * n * rate * measured.ingest_us / 1e6
    if first == "instance CPU":
        first = "instance CPU (deliveries)" if delivery >= ingest else "instance CPU (ingest)"
    if broker_cores > assume.broker_usable_cores:
        first = f"RabbitMQ fan-out (then {first})"
    return Size(
        streams=streams,
        per_minute=per_minute,
        instances=instances,
        shards=shards,
        partitions=shards,
        streams_per_instance=round(n),
        memory_share=n / limits["instance memory"],
        cpu_share=_cores(n, k * n * rate, rate, measured) / assume.cpu_usable,
        cpu_after_loss_share=n / limits["instance CPU"],
        delivery_cpu_share=delivery / assume.cpu_usable,
        ingest_cpu_share=ingest / assume.cpu_usable,
        heartbeat_cpu_share=n * measured.heartbeat_cores_per_stream / assume.cpu_usable,
        connect_share=n / limits["connects per second (reconnect storm)"],
        messages_in=messages_in,
        messages_out=messages_out,
        bytes_out=messages_out * assume.wire_bytes_per_message,
        broker_cores=broker_cores,
        first_to_run_out=first,
    )


def _count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _percent(share: float) -> str:
    return f"{100 * share:.0f} %"


def markdown(measured: Figures, assume: Assumptions) -> str:
    """The figures, the assumptions, the table and what one unsharded instance could take."""
    lines = ["Measured figures:", ""]
    for name in (
        "memory_kb_per_stream",
        "heartbeat_cores_per_stream",
        "delivery_us",
        "ingest_us",
        "connect_ms",
        "broker_us_per_message",
    ):
        value = getattr(measured, name)
        lines.append(f"- {name} = {value:.4g} ({measured.sources[name]})")
    lines += ["", "Assumptions:", ""]
    lines += [f"- {name} = {value}" for name, value in vars(assume).items()]
    lines += [
        "",
        "| open streams | msg/stream/min | instances (shards x k) | P | streams/instance "
        "| memory, one lost | CPU (deliveries + ingest + heartbeats) | CPU, one lost | storm "
        "| RabbitMQ in | RabbitMQ out (msg/s, bytes/s) | broker CPU | runs out first |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for streams in SIZES:
        for per_minute in RATES:
            row = size(streams, per_minute, measured, assume)
            lines.append(
                f"| {_count(row.streams)} | {row.per_minute:g} | {row.instances} "
                f"({row.shards} x {assume.instances_per_shard}) | {row.partitions} "
                f"| {_count(row.streams_per_instance)} | {_percent(row.memory_share)} "
                f"| {_percent(row.cpu_share)} ({_percent(row.delivery_cpu_share)} + "
                f"{_percent(row.ingest_cpu_share)} + {_percent(row.heartbeat_cpu_share)}) "
                f"| {_percent(row.cpu_after_loss_share)} | {_percent(row.connect_share)} "
                f"| {_count(row.messages_in)}/s | {_count(row.messages_out)}/s, "
                f"{_count(row.bytes_out)}B/s | {_count(row.broker_cores)} cores "
                f"| {row.first_to_run_out} |"
            )
    unsharded = assume.cpu_usable / (measured.ingest_us / 1e6)
    lines += [
        "",
        f"Unsharded (P = 1), every instance ingests every message: at "
        f"{measured.ingest_us:.0f} µs each, the whole fleet tops out near "
        f"{_count(unsharded)} messages/s ({assume.cpu_usable:g} of a core on ingest alone), "
        f"i.e. {_count(unsharded * 60)} streams at 1 message a minute, "
        f"{_count(unsharded * 6)} at 10, whatever the number of instances.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Read the results files, print the figures, assumptions and table."""
    parser = argparse.ArgumentParser(prog="python -m bench.sizing", description=__doc__)
    parser.add_argument("results", type=Path, nargs="+", help="results.json files, oldest first")
    options = parser.parse_args()
    reports = [json.loads(path.read_text()) for path in options.results]
    print(markdown(figures(reports), Assumptions()))


if __name__ == "__main__":
    main()
