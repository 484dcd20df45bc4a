"""The SSE wire format, checked against a parser written from the WHATWG algorithm."""

from hypothesis import given
from hypothesis import strategies as st

from sse_twisted._framing import comment_frame, event_frame, id_frame, retry_frame
from tests.sse_parser import EventParser


def parse(stream: bytes) -> list[dict[str, str]]:
    parser = EventParser()
    return parser.feed(stream)


def test_an_event_has_its_id_and_one_data_line() -> None:
    assert event_frame(b'{"a":1}', 42) == b'id: 42\ndata: {"a":1}\n\n'


def test_a_named_event_carries_its_event_field() -> None:
    events = parse(event_frame(b"{}", 7, event="reset"))
    assert events == [{"event": "reset", "id": "7", "data": "{}"}]


def test_line_breaks_in_data_become_separate_data_lines_joined_by_the_browser() -> None:
    frame = event_frame(b"one\r\ntwo\rthree\nfour", 1)
    assert frame == b"id: 1\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    assert parse(frame) == [{"event": "message", "id": "1", "data": "one\ntwo\nthree\nfour"}]


def test_comments_and_retry_dispatch_no_event() -> None:
    parser = EventParser()
    assert parser.feed(comment_frame("keep-alive") + retry_frame(2500)) == []
    assert parser.retry == 2500


def test_a_comment_cannot_be_broken_into_fields() -> None:
    assert comment_frame("a\ndata: x") == b": a data: x\n\n"


@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**63))
def test_any_data_arrives_as_exactly_one_event_with_its_id(data: bytes, offset: int) -> None:
    events = parse(event_frame(data, offset))
    assert len(events) == 1
    assert events[0]["id"] == str(offset)
    expected = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").decode("utf-8", "replace")
    assert events[0]["data"] == expected


def test_an_id_alone_moves_the_last_event_id_without_an_event() -> None:
    parser = EventParser()
    assert parser.feed(id_frame(41)) == []
    assert parser.last_event_id == "41"
