"""No spelling of a subscribe path puts its token in a log line.

Twisted routes on percent-decoded segments, so the token can arrive encoded, in another case,
behind another separator or in another position; the access log (and Twisted's own lines
quoting a request) must mask it whichever way it came.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_twisted._paths import loggable_path
from tests.browser import Browser
from tests.fakes import ImmediateAuthenticator, make_resource, render, request_for
from tests.logs import json_log
from tests.publishing import delete_queue, found_contract, publish
from tests.secrets_tracking import new_token, new_uuid
from tests.subscribers import add_local_subscriber
from tests.test_hostile_paths import answer_to
from tests.twistd_processes import spawn_twistd
from tests.waiting import bounded, wait_for

# The least of a token that must not be readable in a line.
_PIECE = 12


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def token_pieces_in(lines: list[str], token: str) -> list[str]:
    """The lines in which ``_PIECE`` consecutive characters of ``token`` can be read, in any
    case, as written or after percent-decoding it up to three times."""
    pieces = {token[start : start + _PIECE] for start in range(len(token) - _PIECE + 1)}
    leaking = []
    for line in lines:
        for text in [line, *_strings(json.loads(line))]:
            readings = [text]
            for _ in range(3):
                readings.append(unquote(readings[-1]))
            if any(piece in reading.lower() for reading in readings for piece in pieces):
                leaking.append(line)
                break
    return leaking


def test_the_leak_check_reads_a_token_in_any_case_and_encoding() -> None:
    token = new_uuid()
    encoded = "".join(f"%{ord(character):02X}" for character in token)
    for spelling in (token, token.upper(), encoded, encoded.lower(), encoded.replace("%", "%25")):
        line = json.dumps({"message": f"GET /x/{spelling}", "path": "/"})
        assert token_pieces_in([line], token) == [line]
    assert token_pieces_in([json.dumps({"message": token[: _PIECE - 1] + "…"})], token) == []


def test_the_logged_path_shows_only_what_cannot_carry_a_token() -> None:
    topic, userid, token = new_uuid(), new_uuid(), new_uuid()
    admitted = {
        f"/subscribe/{topic}/{userid}/{token}": f"/subscribe/{topic}/{userid}/****",
        f"/%73ubscribe/{topic}/{userid}/{token}": f"/%73ubscribe/{topic}/{userid}/****",
        f"/subscribe/{token}/{userid}/{token}": f"/subscribe/****/{userid}/****",
    }
    for path, logged in admitted.items():
        assert loggable_path(path.encode("ascii"), authenticated=True) == logged, path
    cases = {
        f"/subscribe/{topic}/{userid}/{token}": "/subscribe/****/****/****",
        f"/subscribe/{userid}/{token}/{topic}": "/subscribe/****/****/****",
        f"/subscribe/{topic}/{userid}/{token}%0A": "/subscribe/****/****/****",
        f"/subscribe/{topic}/{userid}/{token}/": "/subscribe/****/****/****/",
        f"/subscribe/{userid}/{token}": "/subscribe/****/****",
        f"/SUBSCRIBE/{topic}/{userid}/{token}": "/SUBSCRIBE/****/****/****",
        f"/subscribes/{topic}/{userid}/{token}": "/subscribes/****/****/****",
        f"/subscribe%00/{topic}/{userid}/{token}": "/****/****/****/****",
        f"/subscribe%2F{topic}%2F{userid}%2F{token}": "/****",
        f"/subscribe\\{topic}\\{userid}\\{token}": "/****",
        f"http://host/subscribe/{topic}/{userid}/{token}": "****",
        "/favicon.ico": "/favicon.ico",
        "/wp-admin//setup": "/wp-admin//setup",
        "/cafe/deadbeef/faced": "/****/****/****",
    }
    for path, logged in cases.items():
        assert loggable_path(path.encode("ascii")) == logged, path


def _spell(character: str, how: str) -> str:
    code = ord(character)
    return {
        "upper": character.upper(),
        "%xx": f"%{code:02x}",
        "%XX": f"%{code:02X}",
        "%2525": f"%25{code:02x}",
    }[how]


_SPELLINGS = st.sampled_from(["upper", "%xx", "%XX", "%2525"])
_MUTATIONS = st.one_of(
    st.tuples(st.just("spell"), st.integers(0, 8), st.lists(st.integers(0, 40)), _SPELLINGS),
    st.tuples(st.just("upper"), st.integers(0, 8)),
    st.tuples(
        st.just("separator"),
        st.integers(0, 8),
        st.sampled_from(["%2F", "%2f", "\\", "%5C", "//", "/./", "%252F"]),
    ),
    st.tuples(
        st.just("suffix"), st.integers(0, 8), st.sampled_from(["%00", "%0A", "%0d%0a", "%20", "."])
    ),
    st.tuples(st.just("truncate"), st.integers(0, 8), st.integers(1, 36), st.booleans()),
    st.tuples(
        st.just("insert"), st.integers(0, 8), st.sampled_from(["", "x", "extra", "..", "UUID"])
    ),
    st.tuples(st.just("drop"), st.integers(0, 8)),
    st.tuples(st.just("swap"), st.integers(0, 8), st.integers(0, 8)),
    st.tuples(
        st.just("first"),
        st.just(0),
        st.sampled_from(["subscribes", "SUBSCRIBE", "Subscribe", "%73ubscribe", "%73%75bscribe"]),
    ),
    st.tuples(
        st.just("query"), st.just(0), st.sampled_from(["lastEventId=1&token=", "t=", "", "#"])
    ),
)


def mutate(segments: list[str], mutations: list[tuple[Any, ...]], token: str) -> bytes:
    """``/`` + ``segments`` changed by each of ``mutations`` in turn (indices wrap; an
    inserted ``UUID`` is a fresh one)."""
    segments = list(segments)
    separators = ["/"] * (len(segments) - 1)
    query = ""
    for kind, index, *arguments in mutations:
        at = index % len(segments)
        if kind == "spell":
            positions = {position % max(len(segments[at]), 1) for position in arguments[0]}
            segments[at] = "".join(
                _spell(character, arguments[1]) if place in positions else character
                for place, character in enumerate(segments[at])
            )
        elif kind == "upper":
            segments[at] = segments[at].upper()
        elif kind == "separator" and separators:
            separators[index % len(separators)] = arguments[0]
        elif kind == "suffix":
            segments[at] += arguments[0]
        elif kind == "truncate":
            cut = arguments[0]
            segments[at] = segments[at][cut:] if arguments[1] else segments[at][:-cut]
        elif kind == "insert":
            inserted = new_uuid() if arguments[0] == "UUID" else arguments[0]
            segments.insert(index % (len(segments) + 1), inserted)
            separators.append("/")
        elif kind == "drop" and len(segments) > 1:
            del segments[at]
            separators.pop()
        elif kind == "swap":
            other = arguments[0] % len(segments)
            segments[at], segments[other] = segments[other], segments[at]
        elif kind == "first":
            segments[0] = arguments[0]
        elif kind == "query":
            query = "?" + arguments[0] + token
    text = segments[0]
    for separator, segment in zip(separators, segments[1:], strict=True):
        text += separator + segment
    return ("/" + text + query).encode("ascii")


def logged_lines_of(
    target: bytes, method: bytes, authenticator: ImmediateAuthenticator
) -> list[str]:
    """Every line the JSON observer writes while the real site answers ``method target``
    and the client leaves."""
    with json_log() as written:
        answer_to(target, method, authenticator)
    return written.getvalue().splitlines()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mutations=st.lists(_MUTATIONS, max_size=6),
    method=st.sampled_from([b"GET", b"GET", b"HEAD", b"OPTIONS", b"POST"]),
)
def test_no_mutation_of_a_subscribe_path_puts_its_token_in_a_log_line(
    mutations: list[tuple[Any, ...]], method: bytes
) -> None:
    userid, token = new_uuid(), new_token()
    target = mutate(["subscribe", new_uuid(), userid, token], mutations, token)
    lines = logged_lines_of(target, method, ImmediateAuthenticator((userid, token)))
    access = [json.loads(line) for line in lines if '"sse_twisted.access"' in line]
    assert access, (target, lines)
    assert token_pieces_in(lines, token) == [], target


def test_a_refusal_before_the_database_answered_does_not_name_a_misplaced_token() -> None:
    userid, token = new_uuid(), new_token()
    resource, _ = make_resource(
        ImmediateAuthenticator((userid, token)), retry_milliseconds=1000, max_streams=0
    )
    request = request_for(f"/subscribe/{userid}/{token}/{new_uuid()}")
    with json_log() as written:
        render(resource, request)
    assert request.responseCode == 429
    [line] = written.getvalue().splitlines()
    assert json.loads(line)["message"].startswith("refused a stream of ****: too many")
    assert token_pieces_in([line], token) == []


@pytest_twisted.ensureDeferred
async def test_twistd_logs_no_token_of_the_issue_paths_and_no_guest_giveaway(
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    browser: Browser,
) -> None:
    userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
    topic = new_uuid()
    # The RabbitMQ password is the default "guest": a queue named with that word must be
    # logged as it is, not as "****-events".
    queue = f"guest-events-{new_uuid()}"
    process, _transport = spawn_twistd(
        {**plaintext_environ, "SSE_RABBITMQ_QUEUE_NAME": queue}, tmp_path
    )
    try:
        port = await bounded(process.port, 30)
        await bounded(process.consuming, 30)
        base = f"https://localhost:{port}"
        encoded = f"{base}/%73ubscribe/{topic}/{userid}/{token}"
        # Twisted routes the encoded path to a real stream: one the client leaves, one the
        # server ends as it drains on SIGTERM.
        response, left = await browser.open(encoded)
        _, drained = await browser.open(encoded)
        assert response.code == 200
        await publish(5672, queue, found_contract(userid))
        assert json.loads((await left.next_event())["data"])["userid"] == userid
        await drained.next_event()
        left.close()
        await wait_for(
            lambda: any("client disconnected" in line["message"] for line in process.lines),
            "the access line of the stream the client left",
        )
        for path in (
            f"/subscribe%2F{topic}%2F{userid}%2F{token}",
            f"/subscribes/{topic}/{userid}/{token}",
            f"/SUBSCRIBE/{topic}/{userid}/{token}",
            f"/subscribe%00/{topic}/{userid}/{token}",
            f"/subscribe\\{topic}\\{userid}\\{token}",
            f"/subscribe/{userid}/{token}",
            f"/subscribe/{topic}/{userid}/{token}%0A",
        ):
            refused = await browser.get(base + path)
            assert refused.code in (400, 404), path
            await browser.read_body(refused)
    finally:
        await process.terminate()
        delete_queue(5672, queue)
    await bounded(drained.closed)

    stream_lines = [
        line
        for line in process.lines
        if line["logger"] == "sse_twisted.access" and line["status"] == 200
    ]
    assert sorted(line["outcome"] for line in stream_lines) == [
        "client disconnected",
        "request finished",
    ]
    assert {line["path"] for line in stream_lines} == {f"/%73ubscribe/{topic}/{userid}/****"}
    assert sum(line["logger"] == "sse_twisted.access" for line in process.lines) == 9
    log_file = (tmp_path / "logs" / "sse.log").read_text()
    assert token_pieces_in(log_file.splitlines(), token) == []
    assert token.encode() not in process.raw + process.stderr
    assert any(line["message"].startswith(f"consuming {queue} ") for line in process.lines)
