"""The fleet scenario (issue 13): the same fleet message rate through 1, 2 and 4 shards.

A super stream of ``PARTITIONS`` partitions (named for the run, deleted at its end) takes
``fleet_rate`` messages a second for ``fleet_seconds``, spread round-robin over
``FLEET_USERS`` users, as many in each partition (every partition gets the same share of
the messages, so that one-shard / S is an instance's fair share), published to its
exchange with each user's partition as routing key (L{bench.fleet_publisher}). It is
consumed by S sse-twisted instances, separate ``twistd`` processes, instance ``i``
consuming partitions ``i * P/S`` to ``(i + 1) * P/S - 1`` (``SSE_PARTITIONS``): one shard
of one instance holding every partition, then 2 and 4 shards. ``FLEET_STREAMS`` of the
users, the same ones each time, hold a stream open, each on the instance of its partition;
every other message matches no stream, as most of a real feed's users are offline.

Each instance's CPU (``/proc/<pid>/stat`` user + system) from just before the first publish
until every partition's sentinel reached its stream, divided by the fleet's messages, is its
**CPU per fleet message**; the target is that it falls in proportion to the shards: at S
shards, each instance's within 20 % of the one-shard figure / S. Also per instance: the
messages of its partitions, its deliveries, its CPU per message it consumed, its CPU when
idle (5 s before publishing), its memory, and how often its reactor woke (voluntary context
switches), idle and while messages flowed; over every instance of every layout, a fit of
CPU as a cost per message plus a cost per wake-up (what splits into shards and what each
instance pays however few messages it gets); the broker's CPU (the ``beam.smp`` on port
5672) over the same window, and net of what it spent in the idle 5 s (the broker is shared
with anything else on the machine: an indication only).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sse_twisted._partitions import partition_of

from .clients import EventSink, Fleet, Subscription
from .environment import SSE_TWISTED, BenchEnvironment, ServerProcess, broker_pid, sample
from .environment import server_process as new_server_process

if TYPE_CHECKING:
    from .scenarios import Settings

__all__ = ["PARTITIONS", "SHARDINGS", "fleet", "fleet_headline", "fleet_table"]

PARTITIONS = 4
SHARDINGS = (1, 2, 4)
FLEET_USERS = 10_000
FLEET_STREAMS = 200
TOLERANCE = 0.20
_IDLE_SECONDS = 5.0
_READY_SECONDS = 90.0
_STALL_SECONDS = 30.0


@dataclass
class _Instance:
    """One instance of the fleet: its process, partitions, streams."""

    server: ServerProcess
    partitions: tuple[int, ...]
    fleet: Fleet | None = None
    streams: int = 0


def _partitions_of(instance: int, shards: int) -> tuple[int, ...]:
    per_shard = PARTITIONS // shards
    return tuple(range(instance * per_shard, (instance + 1) * per_shard))


def _cpu_seconds(pid: int | None) -> float:
    """The CPU seconds of ``pid``; NaN when there is none or it has gone."""
    try:
        return sample(pid).cpu_seconds if pid else float("nan")
    except OSError:
        return float("nan")


async def _until_live(instance: _Instance) -> None:
    """Until the instance has read back every partition it consumes (what follows is
    live): a message published before would be read back, not delivered live."""
    deadline = time.monotonic() + _READY_SECONDS
    while True:
        instance.server.read_log()
        live = sum(
            1
            for line in instance.server.log_lines
            if str(line.get("message", "")).startswith("read back ")
        )
        if live >= len(instance.partitions):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"fleet instance not live:\n{instance.server.tail()}")
        await asyncio.sleep(0.1)


def _balanced_users(environment: BenchEnvironment) -> Path:
    """A file of the ``FLEET_USERS`` userids the publisher goes round: the streaming users
    first (real ones, with tokens, at the indices the checks count by), then made-up ones
    (they match no stream) until each partition holds ``FLEET_USERS / PARTITIONS``. Random
    users split unevenly: 10,000 of them gave partitions 24.0 to 26.0 % of the messages,
    which the worst instance's deviation from one-shard / S counted as the server's."""
    streaming = environment.userids[:FLEET_STREAMS]
    room = Counter({partition: FLEET_USERS // PARTITIONS for partition in range(PARTITIONS)})
    room.subtract(partition_of(user, PARTITIONS) for user in streaming)
    users = list(streaming)
    while len(users) < FLEET_USERS:
        user = str(uuid.uuid4())
        partition = partition_of(user, PARTITIONS)
        if room[partition] > 0:
            room[partition] -= 1
            users.append(user)
    path = environment.directory / "fleet-users.txt"
    path.write_text("\n".join(users) + "\n")
    return path


async def _publish(
    environment: BenchEnvironment, stream: str, count: int, rate: float, sentinels: list[str]
) -> dict[str, Any]:
    users = _balanced_users(environment)
    sentinel_file = environment.directory / f"sentinels-{stream}.txt"
    sentinel_file.write_text("\n".join(sentinels) + "\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fleet_publisher",
        "--exchange",
        stream,
        "--partitions",
        str(PARTITIONS),
        "--users",
        str(users),
        "--sentinels",
        str(sentinel_file),
        "--count",
        str(count),
        "--rate",
        str(rate),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    output, errors = await process.communicate()
    if process.returncode:
        raise RuntimeError(f"fleet publisher failed: {errors.decode()[-2000:]}")
    summary: dict[str, Any] = json.loads(output.splitlines()[-1])
    return summary


async def _until_sentinels(sink: EventSink, sentinel_seqs: set[int]) -> bool:
    """Until every sentinel arrived (True), or nothing arrived for ``_STALL_SECONDS``."""
    seen = 0
    last_change = time.monotonic()
    while True:
        arrived = sentinel_seqs & {seq for _, seq in sink.seqs[seen:]}
        if arrived:
            sentinel_seqs = sentinel_seqs - arrived
        if not sentinel_seqs:
            return True
        if len(sink.seqs) != seen:
            seen, last_change = len(sink.seqs), time.monotonic()
        elif time.monotonic() - last_change > _STALL_SECONDS:
            return False
        await asyncio.sleep(0.05)


async def _sharding(
    environment: BenchEnvironment, settings: Settings, shards: int, count: int
) -> dict[str, Any]:
    """One layout: ``shards`` instances of ``PARTITIONS / shards`` partitions each."""
    stream = environment.new_super_stream(PARTITIONS)
    instances = []
    for number in range(shards):
        partitions = _partitions_of(number, shards)
        server = new_server_process(
            SSE_TWISTED,
            environment,
            f"fleet-{shards}-{number}",
            settings.source,
            dict(settings.server_environ)
            | {
                "SSE_RABBITMQ_PARTITIONS": str(PARTITIONS),
                "SSE_PARTITIONS": ",".join(str(each) for each in partitions),
            },
        )
        server.queue = stream
        instances.append(_Instance(server, partitions))
    sink = EventSink(record_seq=True)
    try:
        await asyncio.gather(*(instance.server.start() for instance in instances))
        await asyncio.gather(*(_until_live(instance) for instance in instances))
        users = FLEET_USERS
        streaming = range(min(FLEET_STREAMS, len(environment.userids)))
        partition = {
            user: partition_of(environment.userids[user], PARTITIONS) for user in streaming
        }
        sentinels: dict[int, int] = {}
        for user in streaming:
            sentinels.setdefault(partition[user], user)
        if len(sentinels) < PARTITIONS:
            raise RuntimeError("fleet: a partition has no user with a stream")
        failures = 0
        for instance in instances:
            instance.fleet = Fleet(instance.server.port, environment.ca_file, sink)
            mine = [
                Subscription(user, environment.subscribe_path(user))
                for user in streaming
                if partition[user] in instance.partitions
            ]
            opened = await instance.fleet.open_http1(mine, settings.open_concurrency)
            instance.streams = opened.established
            failures += opened.failures
        await asyncio.sleep(1.0)
        broker = broker_pid()
        broker_idle = _cpu_seconds(broker)
        idle_start = [instance.server.sample() for instance in instances]
        await asyncio.sleep(_IDLE_SECONDS)
        idle_end = [instance.server.sample() for instance in instances]
        broker_start = _cpu_seconds(broker)
        # The broker is shared: what it spent while the fleet was idle, others spent.
        broker_background = (broker_start - broker_idle) / _IDLE_SECONDS
        start = [instance.server.sample() for instance in instances]
        rate = settings.fleet_rate
        published = await _publish(
            environment,
            stream,
            count,
            rate,
            [environment.userids[sentinels[number]] for number in range(PARTITIONS)],
        )
        complete = await _until_sentinels(sink, {count + number for number in range(PARTITIONS)})
        end = [instance.server.sample() for instance in instances]
        broker_cpu = _cpu_seconds(broker) - broker_start
        await asyncio.sleep(0.5)  # duplicates, if any, would arrive now
        fleet_messages = published["count"]
        expected = Counter(
            (seq % users, seq) for seq in range(count) if seq % users < len(streaming)
        ) + Counter((user, count + number) for number, user in sentinels.items())
        received = Counter(sink.seqs)
        misrouted = sum(n for (user, seq), n in received.items() if (user, seq) not in expected)
        per_instance = []
        for index, instance in enumerate(instances):
            consumed = sum(published["per_partition"][number] for number in instance.partitions)
            cpu = end[index].cpu_seconds - start[index].cpu_seconds
            idle_cpu = idle_end[index].cpu_seconds - idle_start[index].cpu_seconds
            wake_ups = end[index].wake_ups - start[index].wake_ups
            idle_wake_ups = idle_end[index].wake_ups - idle_start[index].wake_ups
            delivered = sum(
                n for (user, _), n in received.items() if partition[user] in instance.partitions
            )
            per_instance.append(
                {
                    "partitions": ",".join(str(each) for each in instance.partitions),
                    "streams": instance.streams,
                    "consumed_messages": consumed,
                    "deliveries": delivered,
                    "cpu_seconds": round(cpu, 3),
                    "cpu_us_per_fleet_message": round(1e6 * cpu / fleet_messages, 2),
                    "cpu_us_per_consumed_message": round(1e6 * cpu / max(consumed, 1), 2),
                    "idle_cpu_percent": round(100 * idle_cpu / _IDLE_SECONDS, 2),
                    "wake_ups": wake_ups,
                    "wake_ups_per_second": round(wake_ups / (end[index].at - start[index].at), 1),
                    "idle_wake_ups_per_second": round(idle_wake_ups / _IDLE_SECONDS, 1),
                    "idle_cpu_us_per_wake_up": round(1e6 * idle_cpu / max(idle_wake_ups, 1), 1),
                    "rss_kb": end[index].rss_kib,
                    "warnings": len(instance.server.problems()),
                }
            )
        window = max(each.at for each in end) - min(each.at for each in start)
        return {
            "shards": shards,
            "instances": per_instance,
            "fleet_messages": fleet_messages,
            "publish_rate": round(published["publish_rate"], 1),
            "window_seconds": round(window, 3),
            "complete": complete,
            "open_failures": failures,
            "expected_deliveries": sum(expected.values()),
            "lost": sum((expected - received).values()),
            "duplicated": sum((received - expected).values()) - misrouted,
            "misrouted": misrouted,
            "broker_cpu_us_per_fleet_message": round(1e6 * broker_cpu / fleet_messages, 2),
            "broker_background_cpu_percent": round(100 * broker_background, 1),
            "broker_net_cpu_us_per_fleet_message": round(
                1e6 * (broker_cpu - broker_background * window) / fleet_messages, 2
            ),
            "load_average": Path("/proc/loadavg").read_text().split()[:3],
        }
    finally:
        for instance in instances:
            if instance.fleet is not None:
                instance.fleet.close_all()
        await asyncio.gather(*(instance.server.stop() for instance in instances))


def _verdicts(shardings: list[dict[str, Any]]) -> None:
    """Add each instance's ratio to the one-shard figure, and each layout's worst distance
    from the target (one-shard / S)."""
    single = shardings[0]["instances"][0]["cpu_us_per_fleet_message"]
    for sharding in shardings:
        worst = 0.0
        for instance in sharding["instances"]:
            ratio = instance["cpu_us_per_fleet_message"] / single if single else float("nan")
            instance["ratio_to_one_shard"] = round(ratio, 3)
            # 1 at exactly 1/S of the one-shard figure.
            instance["ratio_times_shards"] = round(ratio * sharding["shards"], 3)
            worst = max(worst, abs(ratio * sharding["shards"] - 1))
        sharding["worst_deviation_from_proportional"] = round(worst, 3)


def _per_message_and_per_wake_up(shardings: list[dict[str, Any]]) -> dict[str, float]:
    """The least-squares fit, over every instance of every layout, of its CPU as ``a`` per
    message it consumed plus ``w`` per wake-up of its reactor: what a message costs, and
    what the instance pays each time it wakes however few messages it finds."""
    instances = [instance for sharding in shardings for instance in sharding["instances"]]
    pairs = [(instance["consumed_messages"], instance["wake_ups"]) for instance in instances]
    cpus = [instance["cpu_seconds"] for instance in instances]
    mm = sum(m * m for m, _ in pairs)
    mk = sum(m * k for m, k in pairs)
    kk = sum(k * k for _, k in pairs)
    mc = sum(m * c for (m, _), c in zip(pairs, cpus, strict=True))
    kc = sum(k * c for (_, k), c in zip(pairs, cpus, strict=True))
    determinant = mm * kk - mk * mk
    if not determinant:
        return {}
    return {
        "cpu_us_per_message": round(1e6 * (mc * kk - kc * mk) / determinant, 2),
        "cpu_us_per_wake_up": round(1e6 * (kc * mm - mc * mk) / determinant, 1),
    }


async def fleet(environment: BenchEnvironment, settings: Settings) -> dict[str, Any]:
    """The fleet scenario: each layout of ``SHARDINGS`` in turn, then the verdicts."""
    count = int(settings.fleet_rate * settings.fleet_seconds)
    shardings = []
    for shards in SHARDINGS:
        print(f"bench:   fleet: {shards} shard(s) ...", file=sys.stderr)
        shardings.append(await _sharding(environment, settings, shards, count))
    _verdicts(shardings)
    return {
        "scenario": "fleet",
        "partitions": PARTITIONS,
        "rate": settings.fleet_rate,
        "messages": count,
        "users": FLEET_USERS,
        "streams": min(FLEET_STREAMS, len(environment.userids)),
        "shardings": shardings,
        "fit": _per_message_and_per_wake_up(shardings),
    }


def fleet_headline(result: dict[str, Any]) -> dict[str, Any]:
    """The per-run figures: each layout's worst instance CPU per fleet message and verdict."""
    return {
        f"{each['shards']}_shards": {
            "cpu_us_per_fleet_message": max(
                instance["cpu_us_per_fleet_message"] for instance in each["instances"]
            ),
            "worst_deviation": each.get("worst_deviation_from_proportional"),
            "lost": each["lost"],
        }
        for each in result["shardings"]
    }


def fleet_table(result: dict[str, Any]) -> str:
    """A plain-text table: every instance of every layout, its CPU per fleet message, its
    ratio to one shard against the target (1/S, within 20 %), and the verdict per layout."""
    header = (
        "shards",
        "instance",
        "partitions",
        "streams",
        "consumed",
        "CPU/fleet msg",
        "ratio to 1 shard",
        "target",
        "CPU/consumed msg",
        "idle CPU",
        "wake-ups/s",
    )
    rows = [header]
    verdicts = []
    for sharding in result["shardings"]:
        shards = sharding["shards"]
        for number, instance in enumerate(sharding["instances"]):
            rows.append(
                (
                    str(shards),
                    str(number),
                    instance["partitions"],
                    str(instance["streams"]),
                    str(instance["consumed_messages"]),
                    f"{instance['cpu_us_per_fleet_message']} µs",
                    f"{instance.get('ratio_to_one_shard', '')}",
                    f"{1 / shards:.3f} ± 20 %",
                    f"{instance['cpu_us_per_consumed_message']} µs",
                    f"{instance['idle_cpu_percent']} %",
                    f"{instance.get('wake_ups_per_second', '')}",
                )
            )
        if shards > 1:
            # From the (median) deviation: a median of the runs' verdicts means nothing.
            deviation = sharding["worst_deviation_from_proportional"]
            verdict = "met" if deviation <= TOLERANCE else "MISSED"
            runs = [
                each[f"{shards}_shards"]["worst_deviation"] for each in result.get("per_run", [])
            ]
            verdicts.append(
                f"fleet: {shards} shards: worst instance {100 * deviation:.1f} % from "
                f"one-shard / {shards} (runs: {', '.join(f'{100 * run:.1f} %' for run in runs)})"
                f": {verdict}; lost / duplicated / misrouted "
                f"{sharding['lost']} / {sharding['duplicated']} / {sharding['misrouted']}; "
                f"window {sharding['window_seconds']} s"
            )
        else:
            verdicts.append(
                f"fleet: 1 shard: lost / duplicated / misrouted {sharding['lost']} / "
                f"{sharding['duplicated']} / {sharding['misrouted']}; "
                f"window {sharding['window_seconds']} s"
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(
        [
            f"fleet: P = {result['partitions']}, {result['messages']} messages at "
            f"{result['rate']} msg/s over {result['users']} users, {result['streams']} streams",
            *lines,
            *verdicts,
            *_fit_line(result),
        ]
    )


def _fit_line(result: dict[str, Any]) -> list[str]:
    fit = result.get("fit") or {}
    if not fit:
        return []
    idle = [
        instance["idle_cpu_us_per_wake_up"]
        for sharding in result["shardings"]
        for instance in sharding["instances"]
    ]
    return [
        f"fleet: over every instance, CPU = {fit['cpu_us_per_message']} µs per message "
        f"consumed + {fit['cpu_us_per_wake_up']} µs per wake-up of its reactor (least "
        f"squares); an idle instance's wake-ups cost {min(idle)} to {max(idle)} µs each"
    ]
