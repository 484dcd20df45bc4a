"""Message validation: what is delivered, what is skipped and why."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sse_twisted._framing import event_frame
from sse_twisted._messages import (
    INVALID_REASONS,
    InvalidMessage,
    MessageSchema,
    find_userid,
    message_type,
    parse_message,
)
from tests.sse_parser import EventParser

USERID = "0b8e3a52-6a3e-4c1e-9f4a-2d7b1c9e5a10"
TOPIC = "7a1f4c2e-9d3b-4f6a-8e2c-5b0d1a7c3e94"


def found_contract(**fields: object) -> dict[str, object]:
    message: dict[str, object] = {
        "userid": USERID,
        "filename": "report.pdf",
        "filepath": "/x/report.pdf",
        "finished": False,
        "type": "foundcontract",
    }
    message.update(fields)
    return message


def test_a_pretty_printed_message_becomes_one_line_of_the_same_json() -> None:
    body = json.dumps(found_contract(), indent=2).encode()
    message = parse_message(body)
    assert b"\n" not in message.data
    assert json.loads(message.data) == found_contract()
    assert message.userid == USERID
    assert message.topic is None


def test_unknown_fields_are_passed_through() -> None:
    message = parse_message(json.dumps(found_contract(pages=12, extra={"a": [1]})).encode())
    assert json.loads(message.data)["extra"] == {"a": [1]}


def test_topic_and_userid_are_routed_in_lowercase() -> None:
    message = parse_message(
        json.dumps(found_contract(userid=USERID.upper(), topic=TOPIC.upper())).encode()
    )
    assert (message.userid, message.topic) == (USERID, TOPIC)


@pytest.mark.parametrize(
    ("body", "reason", "kind"),
    [
        (b"{not json", "invalid JSON", "not_json"),
        (b"\xff\xfe{}", "body is not UTF-8", "not_json"),
        (b"[1, 2]", "JSON is a array, not an object", "not_json"),
        (b'"text"', "JSON is a string, not an object", "not_json"),
        (json.dumps({"userid": USERID}).encode(), "missing field 'type'", "unknown_type"),
        (
            json.dumps(found_contract(type="nosuchtype")).encode(),
            "unknown type 'nosuchtype'",
            "unknown_type",
        ),
        (json.dumps(found_contract(type=5)).encode(), "unknown type '5'", "unknown_type"),
        (
            json.dumps(found_contract(userid="bob")).encode(),
            "field 'userid' is not a UUID",
            "bad_recipient",
        ),
        (
            json.dumps(found_contract(userid=None)).encode(),
            "field 'userid' is not a UUID",
            "bad_recipient",
        ),
        (
            json.dumps(found_contract(topic="news")).encode(),
            "field 'topic' is not a UUID",
            "bad_recipient",
        ),
        (
            json.dumps(found_contract(finished="no")).encode(),
            "field 'finished' is a string",
            "bad_field",
        ),
        (
            json.dumps(found_contract(filename=1)).encode(),
            "field 'filename' is a number",
            "bad_field",
        ),
        (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply", "not_json"),
    ],
)
def test_an_invalid_message_is_refused_with_its_reason_and_kind(
    body: bytes, reason: str, kind: str
) -> None:
    with pytest.raises(InvalidMessage) as raised:
        parse_message(body)
    assert str(raised.value).startswith(reason)
    assert raised.value.reason == kind
    assert kind in INVALID_REASONS


def test_a_missing_required_field_is_named() -> None:
    message = found_contract()
    del message["filepath"]
    with pytest.raises(InvalidMessage, match="missing field 'filepath'"):
        parse_message(json.dumps(message).encode())


def test_a_new_type_is_one_small_class() -> None:
    @message_type("invoicepaid")
    class InvoicePaid(MessageSchema):
        invoice: str
        amount: int

    invoice = {"type": "invoicepaid", "userid": USERID, "invoice": "A-1", "amount": 3}
    assert parse_message(json.dumps(invoice).encode()).type == "invoicepaid"
    with pytest.raises(InvalidMessage, match="field 'amount' is a boolean"):
        parse_message(json.dumps(invoice | {"amount": True}).encode())


hostile_text = st.lists(
    st.sampled_from(["\r", "\n", "\r\n\r\n", "data: ", "id: 9", "event: x", ":", "a", "é"]),
    max_size=12,
).map("".join)


@given(filename=hostile_text, extra=hostile_text)
def test_no_message_content_can_inject_an_event_or_a_field(filename: str, extra: str) -> None:
    document = found_contract(filename=filename, note=extra)
    message = parse_message(json.dumps(document, indent=1).encode())
    parser = EventParser()
    events = parser.feed(event_frame(message.data, 17))
    assert len(events) == 1
    assert events[0]["id"] == "17"
    assert events[0]["event"] == "message"
    assert json.loads(events[0]["data"]) == document


OTHER = "5D2C7B1A-3E4F-4A6B-8C9D-0E1F2A3B4C5D"


def test_the_userid_of_a_plain_message_is_found_in_lowercase_without_parsing() -> None:
    upper = found_contract(userid=USERID.upper())
    assert find_userid(json.dumps(upper).encode()) == USERID
    assert find_userid(json.dumps(upper, indent=2).encode()) == USERID


@pytest.mark.parametrize(
    "body",
    [
        # A key that holds "userid" with an escaped quote, before the real one.
        b'{"x\\"userid":"%s","userid":"%s"}' % (OTHER.encode(), USERID.encode()),
        # The key spelt with an escape.
        b'{"user\\u0069d":"%s","userid":"%s"}' % (USERID.encode(), OTHER.encode()),
        # A nested object's userid first.
        b'{"meta":{"userid":"%s"},"userid":"%s"}' % (OTHER.encode(), USERID.encode()),
        # A duplicate key: JSON keeps the last.
        b'{"userid":"%s","userid":"%s"}' % (OTHER.encode(), USERID.encode()),
        # Not a UUID.
        b'{"userid":"nobody"}',
        b"not json",
    ],
)
def test_a_message_whose_userid_needs_parsing_is_left_to_the_parser(body: bytes) -> None:
    assert find_userid(body) is None


decoy_text = st.lists(
    st.sampled_from(['"userid"', ":", '"', "\\", "{", "}", ",", " ", USERID, OTHER, "userid"]),
    max_size=8,
).map("".join)
decoy_values = st.recursive(
    st.none() | st.booleans() | st.integers() | decoy_text,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["userid", "user", "topic"]), inner, max_size=3)
    ),
    max_leaves=6,
)


@given(
    userid=st.sampled_from([USERID, OTHER, "nobody"]),
    extra=st.dictionaries(st.sampled_from(["note", "userid ", "data", "x"]), decoy_values),
    ascii_only=st.booleans(),
    indent=st.none() | st.integers(0, 2),
)
def test_a_userid_found_without_parsing_is_always_the_one_the_parser_finds(
    userid: str, extra: dict[str, object], ascii_only: bool, indent: int | None
) -> None:
    body = json.dumps(
        found_contract(userid=userid) | extra, ensure_ascii=ascii_only, indent=indent
    ).encode()
    found = find_userid(body)
    if found is not None:
        assert found == parse_message(body).userid
