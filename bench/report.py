"""The headline figures of each scenario, and the closing table against the issue's targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ingest

__all__ = ["HEADLINES", "headline_values", "table"]


def _idle(result: dict[str, Any]) -> dict[str, Any]:
    top = result["levels"][-1]
    return {
        "streams": top["streams"],
        "rss_per_stream_kb": top["rss_per_stream_kb"],
        "server_cpu_ms_per_connection": top["server_cpu_ms_per_connection"],
        "generator_cpu_ms_per_connection": top["generator_cpu_ms_per_connection"],
        "idle_server_cpu_percent": result["idle"]["server_cpu_percent"],
        "failures": sum(level["open"]["failures"] for level in result["levels"]),
    }


def _throughput(result: dict[str, Any]) -> dict[str, Any]:
    return {
        key: result[key]
        for key in (
            "deliveries_per_second",
            "server_cpu_us_per_delivery",
            "generator_cpu_us_per_delivery",
            "lost",
            "duplicated",
            "misrouted",
        )
    }


def _latency(result: dict[str, Any]) -> dict[str, Any]:
    return {**result["latency_ms"], "lost": result["lost"], "stalled": result["stalled_streams"]}


def _storm(result: dict[str, Any]) -> dict[str, Any]:
    return {
        key: result[key]
        for key in (
            "seconds_to_all_established",
            "failures",
            "server_cpu_ms_per_connection",
            "generator_cpu_ms_per_connection",
            "failure_reasons",
        )
    }


def _ceiling(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "select_messages_per_second": result["select"]["messages_per_second"],
        "select_cpu_us_per_message": result["select"]["cpu_us_per_message"],
        "twisted_messages_per_second": result["twisted"]["messages_per_second"],
        "twisted_cpu_us_per_message": result["twisted"]["cpu_us_per_message"],
        "broker_latency_p99_ms": result["broker_latency_ms"]["p99"],
    }


HEADLINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "S1": _idle,
    "S5-idle": _idle,
    "S2": _throughput,
    "S5-throughput": _throughput,
    "S3": _latency,
    "S4": _storm,
    "ceiling": _ceiling,
    "ingest": ingest.headline,
}


def headline_values(result: dict[str, Any]) -> dict[str, Any]:
    """The few figures of ``result`` that the table and the per-run lists show."""
    return {"scenario": result["scenario"], **HEADLINES[result["scenario"]](result)}


def _verdict(value: float, target: float, smaller_is_better: bool = True) -> str:
    if value != value:  # NaN
        return "n/a"
    if smaller_is_better:
        if value <= target:
            return f"met ({100 * (target - value) / target:.0f}% under)"
        return f"MISSED by {100 * (value - target) / target:.0f}%"
    if value >= target:
        return f"met (+{100 * (value - target) / target:.0f}%)"
    return f"MISSED by {100 * (target - value) / target:.0f}%"


def table(report: dict[str, Any]) -> str:
    """A plain-text table of the medians, each beside its target where the issue has one."""
    scenarios = report["scenarios"]
    rows: list[tuple[str, str, str, str]] = []

    def row(name: str, value: Any, unit: str, target: str = "", verdict: str = "") -> None:
        rows.append((name, f"{value} {unit}".strip(), target, verdict))

    ceiling = scenarios.get("ceiling")
    if ceiling:
        row(
            "ceiling: bare pika (select) consumer",
            ceiling["select"]["messages_per_second"],
            "msg/s",
        )
        row("ceiling: CPU per message (select)", ceiling["select"]["cpu_us_per_message"], "µs")
        row("ceiling: pika Twisted adapter", ceiling["twisted"]["messages_per_second"], "msg/s")
        row("ceiling: CPU per message (Twisted)", ceiling["twisted"]["cpu_us_per_message"], "µs")
        row("broker alone: latency p99 at S3 pace", ceiling["broker_latency_ms"]["p99"], "ms")
    for key, label in (("s2", "S2"), ("s5-throughput", "S5 h2 S2")):
        result = scenarios.get(key)
        if not result:
            continue
        cpu = result["server_cpu_us_per_delivery"]
        row(f"{label}: server CPU per delivery", cpu, "µs", "≤ 80 µs", _verdict(cpu, 80))
        rate = result["deliveries_per_second"]
        if ceiling:
            fraction = 100 * rate / ceiling["select"]["messages_per_second"]
            row(
                f"{label}: throughput",
                f"{rate} ({fraction:.0f}% of ceiling)",
                "deliveries/s",
                "≥ 90% of ceiling",
                _verdict(fraction, 90, smaller_is_better=False),
            )
        else:
            row(f"{label}: throughput", rate, "deliveries/s")
        broken = result["lost"] + result["duplicated"] + result["misrouted"]
        row(
            f"{label}: lost / duplicated / misrouted",
            f"{result['lost']} / {result['duplicated']} / {result['misrouted']}",
            "",
            "0",
            "met" if broken == 0 else "MISSED",
        )
        row(f"{label}: generator CPU per delivery", result["generator_cpu_us_per_delivery"], "µs")
    latency = scenarios.get("s3")
    if latency:
        ms = latency["latency_ms"]
        row("S3: latency p50 / p90", f"{ms['p50']} / {ms['p90']}", "ms")
        row("S3: latency p99", ms["p99"], "ms", "≤ 2 ms", _verdict(ms["p99"], 2.0))
        row("S3: latency max", ms["max"], "ms")
        row("S3: lost (with stalled clients)", latency["lost"], "", "0", _zero(latency["lost"]))
    storm = scenarios.get("s4")
    if storm:
        cpu = storm["server_cpu_ms_per_connection"]
        row("S4: server CPU per connection", cpu, "ms", "≤ 0.8 ms", _verdict(cpu, 0.8))
        row("S4: failures", storm["failures"], "", "0", _zero(storm["failures"]))
        row("S4: time to all established", storm["seconds_to_all_established"], "s")
        row("S4: generator CPU per connection", storm["generator_cpu_ms_per_connection"], "ms")
    for key, label, memory_target in (("s1", "S1", 32.0), ("s5-idle", "S5 h2 S1", 50.0)):
        result = scenarios.get(key)
        if not result:
            continue
        top = result["levels"][-1]
        for level in result["levels"]:
            row(
                f"{label}: RSS per stream at {level['streams']}",
                level["rss_per_stream_kb"],
                "KB",
                f"≤ {memory_target:.0f} KB" if level is top else "",
                _verdict(level["rss_per_stream_kb"], memory_target) if level is top else "",
            )
        cpu = top["server_cpu_ms_per_connection"]
        row(f"{label}: server CPU per new stream", cpu, "ms", "≤ 0.8 ms", _verdict(cpu, 0.8))
        idle = result["idle"]["server_cpu_percent"]
        row(
            f"{label}: idle CPU with heartbeats at {top['streams']}",
            idle,
            "% of a core",
            "≤ 3%" if key == "s1" else "",
            _verdict(idle, 3.0) if key == "s1" else "",
        )
    unwanted = scenarios.get("ingest")
    if unwanted:
        cpu = unwanted["server_cpu_us_per_message"]
        target = ingest.TARGET_US
        row(
            "ingest: server CPU per message for no stream",
            cpu,
            "µs",
            f"≤ {target:.0f} µs",
            _verdict(cpu, target),
        )
        row("ingest: messages consumed per second", unwanted["messages_per_second"], "msg/s")
    widths = [max((len(row[column]) for row in rows), default=0) for column in range(4)]
    lines = []
    header = ("figure (median)", "value", "target", "verdict")
    widths = [max(width, len(title)) for width, title in zip(widths, header, strict=True)]
    for cells in (header, *rows):
        lines.append(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
        )
    return "\n".join(lines)


def _zero(value: int) -> str:
    return "met" if value == 0 else "MISSED"
