"""Open files: the server raises its soft limit to the hard limit at start-up, warns when the
limit cannot hold SSE_MAX_STREAMS, and warns once per burst when descriptors run out."""

from __future__ import annotations

import resource
from collections.abc import Sequence
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import tcp
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, LogPublisher
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from sse_twisted._limits import (
    EMFILE_CLOSED_FORMAT,
    OWN_DESCRIPTORS,
    DescriptorShortageWarnings,
    OpenFileLimit,
    raise_open_file_limit,
    warn_if_limit_below_streams,
)
from tests.browser import Browser
from tests.logs import warnings_logged
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.twistd_processes import TwistdProcess, spawn_twistd
from tests.waiting import bounded, wait_for

HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


class _Limits:
    """getrlimit/setrlimit over a (soft, hard) pair; ``refuse`` makes setrlimit fail."""

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuse = refuse

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if self.refuse:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    limits = _Limits(1024, 524288)
    raised = raise_open_file_limit(limits.getrlimit, limits.setrlimit)
    assert raised == OpenFileLimit(before=1024, soft=524288, hard=524288)
    assert limits.limits == (524288, 524288)


def test_a_refused_raise_keeps_the_soft_limit_and_says_why(log_events: Sequence[LogEvent]) -> None:
    limits = _Limits(1024, 524288, refuse=True)
    assert raise_open_file_limit(limits.getrlimit, limits.setrlimit).soft == 1024
    assert warnings_logged(log_events) == [
        "cannot raise the open-file limit from 1024 to 524288: not allowed to raise maximum limit"
    ]


def test_an_unlimited_hard_limit_is_not_set_as_the_soft_limit() -> None:
    limits = _Limits(1024, resource.RLIM_INFINITY, refuse=True)
    assert raise_open_file_limit(limits.getrlimit, limits.setrlimit).soft == 1024


def test_a_limit_below_max_streams_is_one_warning_naming_both_and_what_to_set(
    log_events: Sequence[LogEvent],
) -> None:
    assert warn_if_limit_below_streams(OpenFileLimit(1024, 1024, 1024), 50_000)
    [warning] = warnings_logged(log_events)
    assert "open-file limit 1024 cannot hold SSE_MAX_STREAMS=50000" in warning
    needed = 50_000 + OWN_DESCRIPTORS
    assert f"LimitNOFILE={needed} in the systemd unit" in warning
    assert f"ulimits: nofile: {needed} in compose" in warning
    assert f"lower SSE_MAX_STREAMS to {1024 - OWN_DESCRIPTORS}" in warning


def test_a_limit_that_holds_max_streams_gives_no_warning(log_events: Sequence[LogEvent]) -> None:
    assert not warn_if_limit_below_streams(OpenFileLimit(1024, 1_048_576, 1_048_576), 50_000)
    assert warnings_logged(log_events) == []


def test_twisteds_emfile_recovery_line_is_the_one_watched() -> None:
    """The watch relies on the text Twisted logs for each connection it closes on EMFILE."""
    assert EMFILE_CLOSED_FORMAT in tcp._accept.__code__.co_consts, (
        "twisted.internet.tcp._accept no longer logs EMFILE_CLOSED_FORMAT: update "
        "sse_twisted._limits for this Twisted version"
    )


def _closed(publisher: LogPublisher, count: int = 1) -> None:
    for _ in range(count):
        publisher(
            {
                "log_format": EMFILE_CLOSED_FORMAT,
                "log_level": LogLevel.info,
                "address": ("127.0.0.1", 40000),
                "log_namespace": "twisted.internet.tcp.Port",
            }
        )


def test_a_burst_of_closed_connections_is_one_warning_with_the_count(
    log_events: Sequence[LogEvent],
) -> None:
    clock, publisher = Clock(), LogPublisher()
    watch = DescriptorShortageWarnings(clock, lambda: 1024, publisher=publisher)
    watch.startService()
    _closed(publisher, 40)
    clock.advance(0.5)
    _closed(publisher, 10)
    clock.advance(0.9)
    assert warnings_logged(log_events) == []
    clock.advance(0.1)
    assert warnings_logged(log_events) == [
        "out of file descriptors: closed 50 new connections unanswered (open-file limit 1024)"
    ]
    clock.advance(30)
    _closed(publisher, 3)
    clock.advance(1)
    assert len(warnings_logged(log_events)) == 2
    assert "closed 3 new connections" in warnings_logged(log_events)[1]
    watch.stopService()
    _closed(publisher)
    clock.advance(1)
    assert len(warnings_logged(log_events)) == 2


def test_a_burst_that_does_not_stop_is_reported_every_ten_seconds(
    log_events: Sequence[LogEvent],
) -> None:
    clock, publisher = Clock(), LogPublisher()
    watch = DescriptorShortageWarnings(clock, lambda: 1024, publisher=publisher)
    watch.startService()
    for _ in range(40):
        _closed(publisher)
        clock.advance(0.5)
    assert [warning.split(" new")[0] for warning in warnings_logged(log_events)] == [
        "out of file descriptors: closed 20",
        "out of file descriptors: closed 20",
    ]
    watch.stopService()


def _messages(process: TwistdProcess) -> list[str]:
    return [line["message"] for line in process.lines]


async def _open_streams(
    browser: Browser, port: int, userid: str, token: str, count: int
) -> list[int | None]:
    """Open ``count`` streams one after the other: each status, None for a connection the
    server closed unanswered."""
    codes: list[int | None] = []
    for _ in range(count):
        url = f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}"
        try:
            response, _tab = await browser.open(url)
        except (ResponseNeverReceived, ResponseFailed):
            codes.append(None)
        else:
            codes.append(response.code)
    return codes


@pytest.mark.skipif(HARD_LIMIT < 1024, reason="needs a hard open-file limit of 1024 or more")
@pytest_twisted.ensureDeferred
async def test_under_a_soft_limit_of_64_twistd_holds_200_streams(
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    browser: Browser,
) -> None:
    userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
    environ = {**plaintext_environ, "SSE_MAX_STREAMS_PER_USER": "1000", "SSE_MAX_STREAMS": "500"}
    process, _transport = spawn_twistd(environ, tmp_path, open_files=(64, HARD_LIMIT))
    try:
        port = await bounded(process.port, 30)
        codes = await _open_streams(browser, port, userid, token, 200)
        assert codes == [200] * 200
    finally:
        try:
            await browser.close_all()
        finally:
            await process.terminate()
    limit = f"open-file limit {HARD_LIMIT} (was 64) holds SSE_MAX_STREAMS=500"
    assert limit in _messages(process)


@pytest_twisted.ensureDeferred
async def test_under_a_hard_limit_of_128_twistd_warns_at_start_and_counts_what_it_closed(
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    browser: Browser,
) -> None:
    userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
    environ = {**plaintext_environ, "SSE_MAX_STREAMS_PER_USER": "1000"}
    process, _transport = spawn_twistd(environ, tmp_path, open_files=(128, 128))
    try:
        port = await bounded(process.port, 30)
        codes = await _open_streams(browser, port, userid, token, 160)
        unanswered = codes.count(None)
        assert 0 < unanswered < 160 and set(codes) == {200, None}

        def reported() -> int:
            return sum(
                line["count"]
                for line in process.lines
                if line["message"].startswith("out of file descriptors")
            )

        await wait_for(lambda: reported() == unanswered, "no warning with the count")
    finally:
        try:
            await browser.close_all()
        finally:
            await process.terminate()
    [start_up] = [m for m in _messages(process) if m.startswith("open-file limit")]
    assert start_up.startswith("open-file limit 128 cannot hold SSE_MAX_STREAMS=50000")
    warned = [line for line in process.lines if line["message"].startswith("out of file")]
    assert warned and all(line["@level"] == "warn" for line in warned)
