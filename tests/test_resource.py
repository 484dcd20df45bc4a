"""The subscribe resource's answers, with a scripted authenticator and Twisted's fake request.

The whole path over real TLS, PostgreSQL and RabbitMQ is in test_end_to_end.py; these
cover each answer, including backend faults a real server cannot produce on demand.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sse_twisted._live import LiveStart
from sse_twisted._replay import ReplayWindow
from sse_twisted._resource import SubscribeResource, path_problem, root_resource
from sse_twisted._streams import StreamRegistry
from sse_twisted.interfaces import BackendUnavailable, IAuthenticator
from tests.sse_parser import EventParser

TOPIC = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"
USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
NONCE = "3c9d2f7e-1b4a-4e8d-a6c5-7f0e2b9d4c31"


@implementer(IAuthenticator)
class ScriptedAuthenticator:
    """Answers each check with the next scripted result."""

    connected = True

    def __init__(self, *answers: bool | Exception | Deferred[bool]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, str]] = []

    def is_subscriber(self, userid: str, nonce: str) -> Deferred[bool]:
        self.asked.append((userid, nonce))
        answer = self.answers.pop(0)
        if isinstance(answer, Deferred):
            return answer
        if isinstance(answer, Exception):
            return fail(answer)
        return succeed(answer)


def make_resource(
    authenticator: ScriptedAuthenticator, origins: tuple[str, ...] = ("*",)
) -> tuple[SubscribeResource, StreamRegistry]:
    registry = StreamRegistry()
    window = ReplayWindow(Clock(), 60, 100)
    live = LiveStart(registry, window, Clock(), future_id_grace_seconds=3)
    live.tail_known(-1)  # an empty stream, read back
    resource = SubscribeResource(
        registry,
        authenticator,
        Clock(),
        window,
        live,
        cors_origins=origins,
        retry_milliseconds=2000,
        max_buffer_bytes=1000,
    )
    return resource, registry


class StreamingRequest(DummyRequest):
    """DummyRequest drives any producer as a pull producer; streams are push producers."""

    producer = None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None


def request_for(path: str, method: bytes = b"GET") -> DummyRequest:
    request = StreamingRequest([part.encode() for part in path.lstrip("/").split("/")[1:]])
    request.method = method
    return request


def render(resource: SubscribeResource, request: DummyRequest) -> bytes:
    result = resource.render(request)
    if isinstance(result, bytes):
        return result
    return b"".join(request.written)


def test_the_scripted_authenticator_provides_the_interface() -> None:
    verifyObject(IAuthenticator, ScriptedAuthenticator())


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
    resource, _ = make_resource(authenticator, origins=("https://app.example",))
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
    resource, _ = make_resource(authenticator, origins=("https://app.example",))
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
    resource._window.consumed(41)
    request = request_for(f"/subscribe/{TOPIC}/{USERID}/{NONCE}")
    render(resource, request)
    parser = EventParser()
    assert parser.feed(b"".join(request.written)) == []
    assert parser.last_event_id == "41"
