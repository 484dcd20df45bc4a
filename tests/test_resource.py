"""The subscribe resource's answers, with a scripted authenticator and Twisted's fake request.

The whole path over real TLS, PostgreSQL and RabbitMQ is in test_end_to_end.py; these
cover each answer, including backend faults a real server cannot produce on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._auth_cache import CachingAuthenticator
from sse_twisted._metrics import Metrics
from sse_twisted._resource import root_resource
from sse_twisted._site import EventStreamSite
from sse_twisted._subscribe import path_problem
from sse_twisted.interfaces import BackendBusy, BackendUnavailable
from tests.fakes import ScriptedAuthenticator, make_resource, render, request_for, window_of
from tests.sse_parser import EventParser

TOPIC = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"
USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
NONCE = "3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31"


def test_a_known_subscriber_gets_an_event_stream_that_opens_at_once() -> None:
    authenticator = ScriptedAuthenticator(True)
    resource, registry = make_resource(authenticator)
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    assert authenticator.asked == [(USERID, NONCE)]
    assert request.responseCode == 200
    headers = request.responseHeaders
    assert headers.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert headers.getRawHeaders(b"x-accel-buffering") == [b"no"]
    assert headers.getRawHeaders(b"access-control-allow-origin") == [b"*"]
    parser = EventParser()
    assert parser.feed(b"".join(request.written)) == []
    assert parser.comments == ["connected"]
    assert parser.retry == 2000
    assert [stream.userid for stream in registry] == [USERID]
    assert not request.finished


def test_a_closed_stream_leaves_the_registry_at_once() -> None:
    resource, registry = make_resource(ScriptedAuthenticator(True))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    request.processingFailed(Failure(ConnectionError("client went away")))
    assert len(registry) == 0


def test_a_stream_whose_client_disconnects_is_no_longer_open() -> None:
    # A real Request on Twisted's HTTP/1.1 channel, in memory, whose connection is lost.
    resource, registry = make_resource(ScriptedAuthenticator(True))
    clock = Clock()
    site = EventStreamSite(root_resource(resource), clock, metrics=Metrics())
    site.reactor = clock  # type: ignore[assignment]
    protocol = site.buildProtocol(None)
    assert protocol is not None
    protocol.makeConnection(StringTransport())
    protocol.dataReceived(
        f"GET /subscribe/{TOPIC}/{USERID}/{NONCE} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
    )
    [stream] = registry
    assert stream.is_open
    protocol.connectionLost(Failure(ConnectionDone("client went away")))
    assert not stream.is_open
    assert len(registry) == 0
    # What the lifetime and the revocation do to a stream they hold: nothing, no error
    # (Twisted raises on finishing a request whose connection is lost).
    stream.close(b"retry: 1000\n\n")


def test_an_unknown_subscriber_is_forbidden() -> None:
    resource, registry = make_resource(ScriptedAuthenticator(False))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    body = render(resource, request)
    assert request.responseCode == 403
    assert body == b"unknown subscriber\n"
    assert request.finished
    assert len(registry) == 0


def test_an_unavailable_database_asks_the_browser_to_come_back() -> None:
    resource, registry = make_resource(ScriptedAuthenticator(BackendUnavailable("db down")))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    body = render(resource, request)
    # EventSource gives up on any non-200; a 200 stream that ends makes it retry.
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/event-stream; charset=utf-8"
    ]
    parser = EventParser()
    assert parser.feed(body) == []
    assert parser.retry == 2000
    assert request.finished
    assert len(registry) == 0


def test_a_client_leaving_during_the_check_cancels_it_and_opens_nothing() -> None:
    pending: Deferred[bool] = Deferred()
    resource, registry = make_resource(ScriptedAuthenticator(pending))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    request.processingFailed(Failure(ConnectionError("client went away")))
    assert pending.called
    assert len(registry) == 0


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/subscribe", "missing topic"),
        (f"/subscribe/{TOPIC}", "missing userid"),
        (f"/subscribe/{TOPIC}/{USERID}", "missing nonce"),
        (f"/subscribe/{TOPIC}/{USERID}/{NONCE}/more", "unexpected path after nonce"),
        (f"/subscribe/{TOPIC}/{USERID}/{NONCE}/", "unexpected path after nonce"),
        (f"/subscribe/news/{USERID}/{NONCE}", "topic is not a lowercase v4 UUID"),
        (f"/subscribe/{TOPIC}/{USERID.upper()}/{NONCE}", "userid is not a lowercase v4 UUID"),
        (f"/subscribe/{TOPIC}/{USERID}/{NONCE[:-1]}", "nonce is not a lowercase v4 UUID"),
        (
            f"/subscribe/{TOPIC}/{USERID}/{NONCE[:14]}1{NONCE[15:]}",
            "nonce is not a lowercase v4 UUID",
        ),
    ],
)
def test_a_malformed_path_is_a_400_naming_the_bad_part(path: str, reason: str) -> None:
    authenticator = ScriptedAuthenticator()
    resource, _ = make_resource(authenticator)
    request = request_for(path)
    body = render(resource, request)
    assert request.responseCode == 400
    assert body.decode().startswith(reason)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/plain; charset=utf-8"]
    assert authenticator.asked == []


def test_path_problem_accepts_exactly_three_v4_uuids() -> None:
    assert path_problem([TOPIC.encode(), USERID.encode(), NONCE.encode()]) is None


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH"])
def test_other_methods_are_405_with_allow(method: bytes) -> None:
    resource, _ = make_resource(ScriptedAuthenticator())
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}", method)
    render(resource, request)
    assert request.responseCode == 405
    assert request.responseHeaders.getRawHeaders(b"allow") == [b"GET, OPTIONS"]


def test_a_preflight_is_answered_without_a_lookup() -> None:
    authenticator = ScriptedAuthenticator()
    resource, _ = make_resource(authenticator, cors_origins=("https://app.example",))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}", b"OPTIONS")
    request.requestHeaders.setRawHeaders(b"origin", [b"https://app.example"])
    render(resource, request)
    assert request.responseCode == 204
    assert request.responseHeaders.getRawHeaders(b"access-control-allow-origin") == [
        b"https://app.example"
    ]
    assert authenticator.asked == []


def test_an_origin_not_configured_is_refused_before_the_lookup() -> None:
    authenticator = ScriptedAuthenticator()
    resource, _ = make_resource(authenticator, cors_origins=("https://app.example",))
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    request.requestHeaders.setRawHeaders(b"origin", [b"https://evil.example"])
    body = render(resource, request)
    assert request.responseCode == 403
    assert body == b"origin not allowed\n"
    assert request.responseHeaders.getRawHeaders(b"access-control-allow-origin") is None
    assert authenticator.asked == []


def test_an_unknown_path_is_a_plain_404() -> None:
    root = root_resource(make_resource(ScriptedAuthenticator())[0])
    request = DummyRequest([b"nothing", b"here"])
    child = root.getChildWithDefault(b"nothing", request)
    body = child.render(request)
    assert request.responseCode == 404
    assert body == b"not found\n"


def test_a_new_stream_is_given_the_newest_offset_consumed_as_its_last_event_id() -> None:
    resource, _ = make_resource(ScriptedAuthenticator(True))
    window_of(resource).consumed(41)
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    parser = EventParser()
    assert parser.feed(b"".join(request.written)) == []
    assert parser.last_event_id == "41"


def _stream_opened(events: Sequence[LogEvent]) -> LogEvent:
    [opened] = [e for e in events if e.get("log_format", "").startswith("stream opened")]
    return opened


def test_stream_opened_counts_no_replayed_event_for_a_new_stream(
    log_events: Sequence[LogEvent],
) -> None:
    resource, _ = make_resource(ScriptedAuthenticator(True))
    window_of(resource).consumed(41)
    render(resource, request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}"))
    assert _stream_opened(log_events)["replayed"] == 0


def test_stream_opened_counts_the_replayed_events_as_the_metric_does(
    log_events: Sequence[LogEvent],
) -> None:
    metrics = Metrics()
    resource, _ = make_resource(ScriptedAuthenticator(True), metrics=metrics)
    for offset in (5, 6, 7):
        window_of(resource).record(USERID, None, offset, f"id: {offset}\ndata: x\n\n".encode())
    # Someone else's event after them: the new stream is also told to resume from 8.
    window_of(resource).record(NONCE, None, 8, b"id: 8\ndata: y\n\n")
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    request.requestHeaders.setRawHeaders(b"last-event-id", [b"5"])
    render(resource, request)
    parser = EventParser()
    assert [event["id"] for event in parser.feed(b"".join(request.written))] == ["6", "7"]
    assert parser.last_event_id == "8"
    assert _stream_opened(log_events)["replayed"] == 2
    assert metrics.registry.get_sample_value("sse_replay_events_sent_total") == 2


def subscribes(metrics: Metrics, outcome: str) -> float | None:
    return metrics.registry.get_sample_value("sse_subscribes_total", {"outcome": outcome})


def assert_asked_to_come_back_later(request: DummyRequest, jitter_milliseconds: int) -> None:
    """The answer EventSource retries: a 200 event stream with a retry: that ends at once."""
    assert request.responseCode == 200
    assert request.responseHeaders.getRawHeaders(b"content-type") == [
        b"text/event-stream; charset=utf-8"
    ]
    parser = EventParser()
    assert parser.feed(b"".join(request.written)) == []
    assert parser.retry is not None and 2000 <= parser.retry <= 2000 + jitter_milliseconds
    assert parser.comments == ["server busy, retry"]
    assert request.finished


def test_past_four_checks_in_flight_an_address_is_asked_to_come_back_at_jittered_times() -> None:
    pending: list[Deferred[bool]] = [Deferred() for _ in range(5)]
    authenticator = ScriptedAuthenticator(*pending)
    metrics = Metrics()
    resource, _ = make_resource(
        authenticator,
        metrics=metrics,
        max_auth_checks_per_client=4,
        reconnect_jitter_milliseconds=1000,
    )
    path = f"/subscribe/{TOPIC}/{USERID}/{NONCE}"
    for _ in range(4):
        render(resource, request_for(path, client="192.0.2.1"))
    retries = set()
    for _ in range(20):
        refused = request_for(path, client="192.0.2.1")
        render(resource, refused)
        assert_asked_to_come_back_later(refused, jitter_milliseconds=1000)
        parser = EventParser()
        parser.feed(b"".join(refused.written))
        retries.add(parser.retry)
    assert len(authenticator.asked) == 4  # the refused ones cost no query
    assert len(retries) > 1  # jittered: not everyone comes back at the same moment
    assert subscribes(metrics, "too_many_checks") == 20
    # Another address is not held back by this one.
    render(resource, request_for(path, client="192.0.2.2"))
    assert len(authenticator.asked) == 5


def test_an_address_gets_its_place_back_on_every_outcome_of_its_check() -> None:
    leaving: Deferred[bool] = Deferred()
    authenticator = ScriptedAuthenticator(
        True, False, BackendUnavailable("db down"), leaving, Deferred()
    )
    resource, _ = make_resource(authenticator, max_auth_checks_per_client=1)
    path = f"/subscribe/{TOPIC}/{USERID}/{NONCE}"
    render(resource, request_for(path))  # allowed: a stream opens
    render(resource, request_for(path))  # forbidden
    render(resource, request_for(path))  # backend unavailable
    gone = request_for(path)
    render(resource, gone)  # the browser leaves during the check
    gone.processingFailed(Failure(ConnectionError("client went away")))
    assert leaving.called
    waiting = request_for(path)
    render(resource, waiting)  # in flight: holds the only place
    assert len(authenticator.asked) == 5
    refused = request_for(path)
    render(resource, refused)
    assert_asked_to_come_back_later(refused, jitter_milliseconds=0)
    assert len(authenticator.asked) == 5


def test_a_cached_grant_is_let_in_even_when_the_address_is_at_its_limit() -> None:
    authenticator = ScriptedAuthenticator(Deferred(), True)
    authenticator.cached.add((USERID, NONCE))
    resource, registry = make_resource(authenticator, max_auth_checks_per_client=1)
    other_nonce = "5d3c1b2a-0f9e-4d8c-b7a6-958473625140"
    render(resource, request_for(f"/subscribe/{TOPIC}/{USERID}/{other_nonce}"))
    render(resource, request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}"))
    assert [stream.userid for stream in registry] == [USERID]


def test_a_page_opening_twenty_tabs_at_once_takes_one_place_of_its_address() -> None:
    answer: Deferred[bool] = Deferred()
    authenticator = CachingAuthenticator(
        ScriptedAuthenticator(answer), Clock(), ttl_seconds=10, max_entries=10
    )
    resource, registry = make_resource(
        authenticator, max_auth_checks_per_client=4, max_streams_per_user=20
    )
    requests = [request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}") for _ in range(20)]
    for request in requests:
        render(resource, request)
    answer.callback(True)
    assert len(registry) == 20
    assert all(request.responseCode == 200 and not request.finished for request in requests)


def test_a_full_line_of_checks_asks_the_browser_to_come_back_later() -> None:
    authenticator = ScriptedAuthenticator(BackendBusy("256 subscriber checks are waiting"))
    metrics = Metrics()
    resource, registry = make_resource(
        authenticator, metrics=metrics, reconnect_jitter_milliseconds=500
    )
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    assert_asked_to_come_back_later(request, jitter_milliseconds=500)
    assert subscribes(metrics, "auth_queue_full") == 1
    assert subscribes(metrics, "backend_unavailable") == 0
    assert len(registry) == 0


def assert_asked_to_come_back_elsewhere(request: DummyRequest) -> None:
    """A draining server's answer: a 200 event stream with a jittered retry: that ends."""
    assert request.responseCode == 200
    parser = EventParser()
    assert parser.feed(b"".join(request.written)) == []
    assert parser.retry is not None and 2000 <= parser.retry <= 2000 + 1000
    assert parser.comments == ["server stopping, retry"]
    assert request.finished


def test_a_draining_resource_opens_no_stream_and_asks_the_browser_to_come_back() -> None:
    authenticator = ScriptedAuthenticator(True)
    metrics = Metrics()
    resource, registry = make_resource(
        authenticator, metrics=metrics, reconnect_jitter_milliseconds=1000
    )
    resource.drain()
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    assert_asked_to_come_back_elsewhere(request)
    assert authenticator.asked == []  # no query for a stream that cannot open here
    assert len(registry) == 0
    assert subscribes(metrics, "draining") == 1


def test_a_check_answered_after_the_drain_began_opens_no_stream() -> None:
    pending: Deferred[bool] = Deferred()
    metrics = Metrics()
    resource, registry = make_resource(
        ScriptedAuthenticator(pending), metrics=metrics, reconnect_jitter_milliseconds=1000
    )
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    resource.drain()
    pending.callback(True)
    assert_asked_to_come_back_elsewhere(request)
    assert len(registry) == 0
    assert subscribes(metrics, "draining") == 1
