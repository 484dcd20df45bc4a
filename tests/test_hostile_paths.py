"""Every URL shape, through the real site: Twisted's request parsing, the URL tree and the
subscribe resource, fed raw bytes over a fake transport (no network, no global reactor).

Only the exact contract, ``/subscribe/<v4>/<v4>/<v4>`` in lowercase (query strings
ignored), opens a stream; anything else gets 400 or 404 with a one-line reason, or 431
when the request head itself is too long; never a 500, never a stream.
"""

from __future__ import annotations

import re
import string
import uuid
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from sse_twisted._metrics import Metrics
from sse_twisted._resource import root_resource
from sse_twisted._site import EventStreamSite
from sse_twisted.interfaces import IAuthenticator
from tests.fakes import ImmediateAuthenticator, make_resource

_V4 = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def expected_status(target: bytes) -> int:
    """The contract, stated independently of the server: 200, 400 or 404."""
    path = target.split(b"?", 1)[0]
    segments = [unquote_to_bytes(segment) for segment in path.split(b"/")]
    if len(segments) < 2 or segments[0] != b"" or segments[1] != b"subscribe":
        return 404
    parts = segments[2:]
    if len(parts) == 3 and all(_V4.fullmatch(part) for part in parts):
        return 200
    return 400


def v4() -> st.SearchStrategy[str]:
    return st.builds(lambda: str(uuid.uuid4())) | st.uuids(version=4).map(str)


_URL_CHARACTERS = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/%"
segment = st.one_of(
    v4(),
    v4().map(str.upper),
    st.uuids(version=1).map(str),
    st.uuids().map(lambda value: value.hex),
    v4().map(lambda value: value[:-1]),
    v4().map(lambda value: value + "0"),
    v4().map(lambda value: "".join(f"%{ord(c):02x}" for c in value)),
    st.just("%2F"),
    st.just("%00"),
    st.just(""),
    st.just(".."),
    st.text(_URL_CHARACTERS, max_size=40),
    st.binary(max_size=12).map(lambda raw: "".join(f"%{byte:02X}" for byte in raw)),
)
query = st.one_of(
    st.just(""),
    st.text(_URL_CHARACTERS + "?", max_size=30).map(lambda text: "?" + text),
    st.just("?lastEventId=%FF%FE"),
)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    first = draw(st.sampled_from(["subscribe", "subscribe", "Subscribe", "subscribe%2F", "", "x"]))
    if draw(st.booleans()):
        # Contract-shaped: three parts, each a v4 UUID or one of the near misses.
        parts = draw(st.lists(v4() | segment, min_size=3, max_size=3))
    else:
        parts = draw(st.lists(segment, max_size=5))
    slash = draw(st.sampled_from(["", "", "/"]))
    text = "/" + "/".join([first, *parts]) + slash + draw(query)
    if draw(st.booleans()) and draw(st.booleans()):
        text += "/" + "a" * draw(st.integers(8000, 9000))
    return text.encode("ascii")


def answer_to(
    target: bytes, method: bytes = b"GET", authenticator: IAuthenticator | None = None
) -> tuple[bytes, int]:
    """The server's answer to ``method target``, and how many streams it opened; every
    pair is a subscriber unless ``authenticator`` says otherwise."""
    resource, registry = make_resource(
        authenticator if authenticator is not None else ImmediateAuthenticator(admit_everyone=True),
        retry_milliseconds=1000,
        max_buffer_bytes=10_000,
    )
    site = EventStreamSite(root_resource(resource), Clock(), metrics=Metrics())
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    answer = transport.value()
    opened = len(registry)
    channel.connectionLost(Failure(ConnectionDone()))
    assert len(registry) == 0
    return answer, opened


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(targets())
def test_only_the_exact_subscribe_path_opens_a_stream_and_every_other_gets_a_reason(
    target: bytes,
) -> None:
    answer, opened = answer_to(target)
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split(b" ")[1])
    event(f"status {status}")
    assert opened == (1 if status == 200 else 0)
    if len(target) > 8192 - 64:
        assert status in (431, expected_status(target))
        return
    assert status == expected_status(target), (target, answer[:300])
    if status == 200:
        assert b"content-type: text/event-stream" in rest.lower()
        assert b": connected\n" in rest
    else:
        body = rest.split(b"\r\n\r\n", 1)[1]
        # One line of reason, whatever the framing (chunked or not).
        assert b"\n" in body and b"internal error" not in body, body


def test_the_oracle_agrees_with_the_contract_on_known_paths() -> None:
    topic, userid, nonce = (str(uuid.uuid4()).encode() for _ in range(3))
    good = b"/subscribe/" + b"/".join([topic, userid, nonce])
    assert expected_status(good) == 200
    assert expected_status(good + b"?lastEventId=7") == 200
    assert expected_status(good + b"/") == 400
    assert expected_status(good.upper().replace(b"/SUBSCRIBE", b"/subscribe")) == 400
    assert expected_status(b"/subscribe/" + topic + b"%2F" + userid + b"/" + nonce) == 400
    assert expected_status(b"/elsewhere") == 404
    for target in (good, good + b"/", b"/elsewhere", b"/subscribe/" + topic + b"%2F" + userid):
        answer, _ = answer_to(target)
        assert int(answer.split(b" ")[1]) == expected_status(target)
