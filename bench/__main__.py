"""``python -m bench``: run the scenarios, print one JSON object per scenario and a table.

Each scenario runs ``--runs`` times (a fresh server each time), against sse-twisted and then
against the reference server (``bench/reference``, uvicorn + sse-starlette), one after the
other in each run; the JSON object holds the median of every figure over the runs, and
``runs`` the individual values of the headline ones. The table shows each figure of both
servers and the ratio sse-twisted / reference. ``--profile`` then runs S2 and S4 once more
under py-spy, against sse-twisted, and adds their top costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import uvloop

from .environment import (
    REFERENCE,
    REPOSITORY,
    SERVERS,
    SSE_TWISTED,
    BenchEnvironment,
    environment,
    raise_file_limit,
)
from .fleet import fleet_table
from .report import headline_values, table
from .scenarios import (
    SCENARIOS,
    SSE_TWISTED_ONLY,
    Settings,
    connect_storm,
    run_scenario,
    throughput,
)

ALL = tuple(SCENARIOS)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--runs", type=int, default=1, help="runs of each scenario (median)")
    parser.add_argument(
        "--scenarios", default=",".join(ALL), help=f"comma-separated, of {', '.join(ALL)}"
    )
    parser.add_argument("--levels", default="1000,5000,10000", help="S1/S5 stream counts")
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--messages", type=int, default=20000, help="S2/S5 messages")
    parser.add_argument(
        "--latency-seconds",
        type=float,
        default=15.0,
        help="S3 window (one heartbeat period at least)",
    )
    parser.add_argument(
        "--latency-idle-streams",
        type=int,
        default=10000,
        help="idle streams S3 opens for its second window (0 = no second window)",
    )
    parser.add_argument("--storm", type=int, default=2000, help="S4 connections")
    parser.add_argument(
        "--resume-connections", type=int, default=500, help="S4r connections in each round"
    )
    parser.add_argument("--fleet-rate", type=float, default=4000.0, help="fleet messages/s")
    parser.add_argument("--fleet-seconds", type=float, default=10.0, help="fleet publishing time")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        help=f"comma-separated, of {', '.join(SERVERS)} (the reference skips "
        f"{', '.join(sorted(SSE_TWISTED_ONLY))})",
    )
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--source",
        type=Path,
        help="run the server from this copy of the tree (sse_twisted/, twisted/plugins/)",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra setting for the server (repeatable), e.g. SSE_RABBITMQ_PREFETCH=2000",
    )
    parser.add_argument(
        "--commit",
        help="run the server from this commit's tree (git archive), not the working tree",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPOSITORY / "build" / "bench" / "results.json",
        help="where to write every result as JSON",
    )
    return parser.parse_args()


def _git(*arguments: str) -> str:
    result = subprocess.run(
        ["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, check=False
    )
    return result.stdout.strip()


def _export(commit: str, directory: Path) -> Path:
    """The server's tree at ``commit``, unpacked into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "sse_twisted", "twisted"],
        cwd=REPOSITORY,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def machine(options: argparse.Namespace) -> dict[str, Any]:
    """What the figures were measured on."""
    import OpenSSL

    import twisted

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    if options.commit:
        measured = f"{_git('rev-parse', '--short', options.commit)} (git archive)"
    elif options.source:
        measured = f"copy in {options.source} (HEAD is {_git('rev-parse', '--short', 'HEAD')})"
    else:
        dirty = _git("status", "--porcelain", "--", "sse_twisted", "twisted")
        measured = _git("rev-parse", "--short", "HEAD") + (
            " + uncommitted changes" if dirty else ""
        )
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "pyopenssl": OpenSSL.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
        "server_code": measured,
        "load_average_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "file_limit": raise_file_limit(),
    }


def _median(values: list[Any]) -> Any:
    """The median of like values, recursively through dicts and lists."""
    first = values[0]
    if isinstance(first, dict):
        return {
            key: _median([value[key] for value in values if key in value])
            for key in first
            if key not in ("profile", "failure_reasons")
        } | ({"failure_reasons": first["failure_reasons"]} if "failure_reasons" in first else {})
    if isinstance(first, list):
        if all(isinstance(value, list) and len(value) == len(first) for value in values):
            return [_median([value[index] for value in values]) for index in range(len(first))]
        return first
    if isinstance(first, bool) or not isinstance(first, int | float):
        return first
    if all(value == first for value in values):
        return first  # an even count's median is a float: 2 shards must stay 2, not 2.0
    numbers = [value for value in values if isinstance(value, int | float)]
    middle = statistics.median(numbers)
    return round(middle, 3) if isinstance(middle, float) else middle


async def _bench(options: argparse.Namespace) -> dict[str, Any]:
    names = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    unknown = set(names) - set(ALL)
    if unknown:
        raise SystemExit(f"bench: unknown scenarios {sorted(unknown)}; known: {', '.join(ALL)}")
    servers = [name.strip() for name in options.servers.split(",") if name.strip()]
    if set(servers) - set(SERVERS):
        raise SystemExit(f"bench: unknown servers in {servers}; known: {', '.join(SERVERS)}")
    levels = tuple(int(level) for level in options.levels.split(","))
    report: dict[str, Any] = {"machine": machine(options)}
    report["settings"] = {key: str(value) for key, value in vars(options).items()}
    fd_limit = report["machine"]["file_limit"]
    if max(levels) + 200 > fd_limit:
        print(
            f"bench: {max(levels)} streams need more than the {fd_limit} file descriptors "
            "RLIMIT_NOFILE allows (hard limit)",
            file=sys.stderr,
        )
    exported = Path(tempfile.mkdtemp(prefix="sse-bench-tree-")) if options.commit else None
    try:
        source = _export(options.commit, exported) if exported else options.source
        settings = Settings(
            levels=levels,
            idle_seconds=options.idle_seconds,
            throughput_messages=options.messages,
            latency_seconds=options.latency_seconds,
            latency_idle_streams=options.latency_idle_streams,
            storm_connections=options.storm,
            resume_connections=options.resume_connections,
            fleet_rate=options.fleet_rate,
            fleet_seconds=options.fleet_seconds,
            source=source,
            server_environ=tuple(
                (name, value)
                for name, _, value in (setting.partition("=") for setting in options.server_env)
            ),
        )
        started = time.monotonic()
        with environment(settings.users) as bench:
            results = await _scenarios(names, servers, bench, settings, options.runs)
            # sse-twisted's results stay where earlier reports had them.
            report["scenarios"] = results.get(SSE_TWISTED, {})
            report["reference"] = results.get(REFERENCE, {})
            report["profiles"] = (
                await _profiles(bench, settings, options.output.parent / "profiles")
                if options.profile
                else {}
            )
        report["wall_seconds"] = round(time.monotonic() - started, 1)
        report["machine"]["load_average_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)
    return report


async def _scenarios(
    names: list[str], servers: list[str], bench: BenchEnvironment, settings: Settings, runs: int
) -> dict[str, dict[str, Any]]:
    """Every scenario ``runs`` times against each server, one server right after the other
    (so that both see the same load on the machine); then one JSON line each with the
    medians. Returns the medians by server, then by scenario."""
    plan = [
        (server, name)
        for name in names
        for server in servers
        if server == SSE_TWISTED or name not in SSE_TWISTED_ONLY
    ]
    per_run: dict[tuple[str, str], list[dict[str, Any]]] = {each: [] for each in plan}
    for run in range(runs):
        for server, name in plan:
            print(f"bench: run {run + 1}/{runs} {name} on {server} ...", file=sys.stderr)
            began = time.monotonic()
            result = await run_scenario(name, bench, replace(settings, server=server))
            result["wall_seconds"] = round(time.monotonic() - began, 1)
            per_run[server, name].append(result)
            print(f"bench:   {json.dumps(headline_values(result))}", file=sys.stderr)
    medians: dict[str, dict[str, Any]] = {server: {} for server in servers}
    for server, name in plan:
        median = _median(per_run[server, name])
        median["runs"] = len(per_run[server, name])
        median["per_run"] = [headline_values(result) for result in per_run[server, name]]
        medians[server][name] = median
        print(json.dumps({"server": server, **median}), flush=True)
    return medians


async def _profiles(bench: BenchEnvironment, settings: Settings, directory: Path) -> dict[str, Any]:
    """S2 and S4 once more, under py-spy; one JSON line each with the top costs."""
    print("bench: profiling S2 and S4 with py-spy ...", file=sys.stderr)
    profiles: dict[str, Any] = {}
    profiled = await throughput(bench, settings, profile=directory / "s2.txt")
    profiles["s2"] = profiled["profile"] | {"figures": headline_values(profiled)}
    profiled = await connect_storm(bench, settings, profile=directory / "s4.txt")
    profiles["s4"] = profiled["profile"] | {"figures": headline_values(profiled)}
    for name, profile in profiles.items():
        print(json.dumps({"profile": name, **profile}), flush=True)
    return profiles


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Run the bench; print the JSON lines and the table; save everything to ``--output``."""
    options = _arguments()
    raise_file_limit()
    # A terminated bench still stops its server and drops its database and queues.
    signal.signal(signal.SIGTERM, _interrupt)
    report = uvloop.run(_bench(options))
    # Saved first: minutes of measurement must not hang on the printing below.
    options.output.parent.mkdir(parents=True, exist_ok=True)
    options.output.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    if "fleet" in report["scenarios"]:
        print()
        print(fleet_table(report["scenarios"]["fleet"]))
    print(f"\nall results: {options.output} ({report['wall_seconds']} s)")


if __name__ == "__main__":
    main()
