"""The headline figures of each scenario, and the closing table: each figure of sse-twisted
beside the reference server's from the same run, their ratio, and the issue's target."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import ingest
from .fleet import fleet_headline

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
    headline = {
        **result["latency_ms"],
        "lost": result["lost"],
        "stalled": result["stalled_streams"],
    }
    with_idle = result.get("with_idle")
    if with_idle:
        headline["idle_p99"] = with_idle["latency_ms"]["p99"]
        headline["idle_max"] = with_idle["latency_ms"]["max"]
    return headline


def _idle_latency(result: dict[str, Any], percentile: str) -> Any:
    """S3's latency with the idle streams open, if that window ran."""
    return result.get("with_idle", {}).get("latency_ms", {}).get(percentile)


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


def _resumed(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "full_server_cpu_ms_per_connection": result["full"]["server_cpu_ms_per_connection"],
        "resumed_server_cpu_ms_per_connection": result["resumed"]["server_cpu_ms_per_connection"],
        "session_reused": result["resumed"]["session_reused"],
        "sessions_with_ticket": result["full"]["sessions_with_ticket"],
        "failures": result["full"]["failures"] + result["resumed"]["failures"],
    }


HEADLINES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "S1": _idle,
    "S5-idle": _idle,
    "S2": _throughput,
    "S5-throughput": _throughput,
    "S3": _latency,
    "S4": _storm,
    "S4r": _resumed,
    "ceiling": _ceiling,
    "ingest": ingest.headline,
    "fleet": fleet_headline,
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


def _zero(value: int) -> str:
    return "met" if value == 0 else "MISSED"


def _ratio(ours: Any, theirs: Any) -> str:
    if (
        isinstance(ours, int | float)
        and isinstance(theirs, int | float)
        and theirs
        and ours == ours
        and theirs == theirs
    ):
        return f"{ours / theirs:.2f}"
    return ""


class _Table:
    """Rows of one figure each: sse-twisted's value, the reference's, their ratio, a target.

    A row's value is read by the same function from both servers' result of a scenario, so
    the two columns always show the same figure; the verdict is sse-twisted's.
    """

    def __init__(self, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
        self.ours = ours
        self.theirs = theirs
        self.rows: list[tuple[str, ...]] = []

    def row(
        self,
        name: str,
        scenario: str,
        figure: Callable[[dict[str, Any]], Any],
        unit: str,
        target: str = "",
        verdict: Callable[[Any], str] | None = None,
    ) -> None:
        ours = figure(self.ours[scenario])
        reference = self.theirs.get(scenario)
        theirs = figure(reference) if reference else None
        self.rows.append(
            (
                name,
                f"{ours} {unit}".strip(),
                "" if theirs is None else f"{theirs} {unit}".strip(),
                _ratio(ours, theirs),
                target,
                verdict(ours) if verdict else "",
            )
        )

    def text(self) -> str:
        header = ("figure (median)", "sse-twisted", "reference", "ratio", "target", "verdict")
        widths = [
            max(len(cells[column]) for cells in (header, *self.rows))
            for column in range(len(header))
        ]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            for cells in (header, *self.rows)
        )


def table(report: dict[str, Any]) -> str:
    """A plain-text table of the medians: sse-twisted's, the reference server's from the same
    run where it ran the scenario, the ratio sse-twisted / reference (below 1: sse-twisted
    does better on a cost, worse on a rate), and the issue's target where it has one."""
    scenarios = report["scenarios"]
    rows = _Table(scenarios, report.get("reference", {}))
    row = rows.row

    ceiling = scenarios.get("ceiling")
    if ceiling:
        row(
            "ceiling: bare pika (select) consumer",
            "ceiling",
            lambda r: r["select"]["messages_per_second"],
            "msg/s",
        )
        row(
            "ceiling: CPU per message (select)",
            "ceiling",
            lambda r: r["select"]["cpu_us_per_message"],
            "µs",
        )
        row(
            "ceiling: pika Twisted adapter",
            "ceiling",
            lambda r: r["twisted"]["messages_per_second"],
            "msg/s",
        )
        row(
            "ceiling: CPU per message (Twisted)",
            "ceiling",
            lambda r: r["twisted"]["cpu_us_per_message"],
            "µs",
        )
        row(
            "broker alone: latency p99 at S3 pace",
            "ceiling",
            lambda r: r["broker_latency_ms"]["p99"],
            "ms",
        )
    # Targets are issue 11's.
    for key, label, cpu_target in (("s2", "S2", 60.0), ("s5-throughput", "S5 h2 S2", 80.0)):
        if key not in scenarios:
            continue
        row(
            f"{label}: server CPU per delivery",
            key,
            lambda r: r["server_cpu_us_per_delivery"],
            "µs",
            f"≤ {cpu_target:.0f} µs",
            lambda value, target=cpu_target: _verdict(value, target),
        )
        row(f"{label}: throughput", key, lambda r: r["deliveries_per_second"], "deliveries/s")
        if ceiling:
            ceiling_rate = ceiling["select"]["messages_per_second"]
            row(
                f"{label}: throughput, % of ceiling",
                key,
                lambda r, ceiling_rate=ceiling_rate: round(
                    100 * r["deliveries_per_second"] / ceiling_rate
                ),
                "%",
                "≥ 90%",
                lambda value: _verdict(value, 90, smaller_is_better=False),
            )
        row(
            f"{label}: lost / duplicated / misrouted",
            key,
            lambda r: f"{r['lost']} / {r['duplicated']} / {r['misrouted']}",
            "",
            "0",
            lambda value: "met" if value == "0 / 0 / 0" else "MISSED",
        )
        row(
            f"{label}: generator CPU per delivery",
            key,
            lambda r: r["generator_cpu_us_per_delivery"],
            "µs",
        )
    if "s3" in scenarios:
        row("S3: latency p50", "s3", lambda r: r["latency_ms"]["p50"], "ms")
        row("S3: latency p90", "s3", lambda r: r["latency_ms"]["p90"], "ms")
        row(
            "S3: latency p99",
            "s3",
            lambda r: r["latency_ms"]["p99"],
            "ms",
            "≤ 2 ms",
            lambda value: _verdict(value, 2.0),
        )
        row(
            "S3: latency max",
            "s3",
            lambda r: r["latency_ms"]["max"],
            "ms",
            "≤ 10 ms",
            lambda value: _verdict(value, 10.0),
        )
        row("S3: lost (with stalled clients)", "s3", lambda r: r["lost"], "", "0", _zero)
    if "with_idle" in scenarios.get("s3", {}):
        label = f"S3 + {scenarios['s3']['with_idle']['idle_streams']:,} idle streams"
        row(f"{label}: latency p50", "s3", lambda r: _idle_latency(r, "p50"), "ms")
        row(f"{label}: latency p90", "s3", lambda r: _idle_latency(r, "p90"), "ms")
        row(
            f"{label}: latency p99",
            "s3",
            lambda r: _idle_latency(r, "p99"),
            "ms",
            "≤ 2 ms",
            lambda value: _verdict(value, 2.0),
        )
        row(
            f"{label}: latency max",
            "s3",
            lambda r: _idle_latency(r, "max"),
            "ms",
            "≤ 10 ms",
            lambda value: _verdict(value, 10.0),
        )
        row(f"{label}: lost", "s3", lambda r: r["with_idle"]["lost"], "", "0", _zero)
    if "s4" in scenarios:
        row(
            "S4: server CPU per connection",
            "s4",
            lambda r: r["server_cpu_ms_per_connection"],
            "ms",
            "≤ 0.7 ms",
            lambda value: _verdict(value, 0.7),
        )
        row("S4: failures", "s4", lambda r: r["failures"], "", "0", _zero)
        row("S4: time to all established", "s4", lambda r: r["seconds_to_all_established"], "s")
        row(
            "S4: generator CPU per connection",
            "s4",
            lambda r: r["generator_cpu_ms_per_connection"],
            "ms",
        )
    if "s4r" in scenarios:
        row(
            "S4r: server CPU per connect, one by one, full handshake",
            "s4r",
            lambda r: r["full"]["server_cpu_ms_per_connection"],
            "ms",
        )
        row(
            "S4r: server CPU per connect, TLS session offered",
            "s4r",
            lambda r: r["resumed"]["server_cpu_ms_per_connection"],
            "ms",
            "≤ 0.4 ms resumed",
            lambda value: _verdict(value, 0.4),
        )
        row(
            "S4r: sessions resumed / offered",
            "s4r",
            lambda r: f"{r['resumed']['session_reused']} / {r['resumed']['established']}",
            "",
        )
        row(
            "S4r: first round's sessions with a ticket",
            "s4r",
            lambda r: r["full"]["sessions_with_ticket"],
            "",
        )
        row(
            "S4r: failures",
            "s4r",
            lambda r: r["full"]["failures"] + r["resumed"]["failures"],
            "",
            "0",
            _zero,
        )
    for key, label, memory_target in (("s1", "S1", 30.0), ("s5-idle", "S5 h2 S1", 50.0)):
        result = scenarios.get(key)
        if not result:
            continue
        top = len(result["levels"]) - 1
        for index, level in enumerate(result["levels"]):
            is_top = index == top
            row(
                f"{label}: RSS per stream at {level['streams']}",
                key,
                lambda r, index=index: r["levels"][index]["rss_per_stream_kb"],
                "KB",
                f"≤ {memory_target:.0f} KB" if is_top else "",
                (lambda value, target=memory_target: _verdict(value, target)) if is_top else None,
            )
        row(
            f"{label}: server CPU per new stream",
            key,
            lambda r: r["levels"][-1]["server_cpu_ms_per_connection"],
            "ms",
            "≤ 0.8 ms",
            lambda value: _verdict(value, 0.8),
        )
        row(
            f"{label}: idle CPU with heartbeats at {result['levels'][-1]['streams']}",
            key,
            lambda r: r["idle"]["server_cpu_percent"],
            "% of a core",
            "≤ 3%" if key == "s1" else "",
            (lambda value: _verdict(value, 3.0)) if key == "s1" else None,
        )
    if "ingest" in scenarios:
        row(
            "ingest: server CPU per message for no stream",
            "ingest",
            lambda r: r["server_cpu_us_per_message"],
            "µs",
            f"≤ {ingest.TARGET_US:.0f} µs",
            lambda value: _verdict(value, ingest.TARGET_US),
        )
        row(
            "ingest: messages consumed per second",
            "ingest",
            lambda r: r["messages_per_second"],
            "msg/s",
        )
    return rows.text()
