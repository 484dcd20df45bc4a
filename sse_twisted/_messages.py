"""Messages from RabbitMQ: parsing, validation against a registry of types, and the event data.

Adding a message type is one small class::

    @message_type("invoicepaid")
    class InvoicePaid(MessageSchema):
        invoice: str
        amount: int
"""

from __future__ import annotations

import json
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ._uuids import is_uuid

__all__ = [
    "INVALID_REASONS",
    "FoundContract",
    "InvalidMessage",
    "Message",
    "MessageSchema",
    "find_userid",
    "message_type",
    "parse_message",
]


INVALID_REASONS = ("not_json", "unknown_type", "bad_recipient", "bad_field")
"""The kinds of invalid message, as one word each (a metrics label; the text has detail)."""


class InvalidMessage(ValueError):
    """The message cannot be delivered; the text says why in a few words.

    @ivar reason: one of L{INVALID_REASONS}.
    """

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(text)
        self.reason = reason


class MessageSchema:
    """Base of message types: annotate the required fields with ``str``, ``bool``, ``int``...

    ``userid`` (a UUID) and an optional ``topic`` are common to every type and checked
    for all of them. Fields a class does not declare are kept and passed through.
    """

    required_fields: ClassVar[dict[str, type]]


_REGISTRY: dict[str, type[MessageSchema]] = {}


def message_type(name: str) -> Callable[[type[MessageSchema]], type[MessageSchema]]:
    """Register a schema class for messages whose ``type`` is ``name``."""

    def register(schema: type[MessageSchema]) -> type[MessageSchema]:
        schema.required_fields = {
            field: hint
            for field, hint in typing.get_type_hints(schema).items()
            if field != "required_fields"
        }
        _REGISTRY[name] = schema
        return schema

    return register


@message_type("foundcontract")
class FoundContract(MessageSchema):
    """A contract file was found for the user (the original Go service's message)."""

    filename: str
    filepath: str
    finished: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A validated message: where it goes and the event data written to each stream."""

    type: str
    userid: str
    topic: str | None
    data: bytes


def _matches(value: Any, expected: type) -> bool:
    # bool is a subclass of int in Python, but not in JSON: true is not a number.
    if expected is not bool and isinstance(value, bool):
        return False
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def _json_type_name(value: Any) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


_USERID_MEMBER = re.compile(
    rb'"userid"\s*:\s*"([0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})"'
)


def find_userid(body: bytes) -> str | None:
    """The lowercase ``userid`` of ``body`` found without parsing it, or None when the body
    is not simple enough for that: then only L{parse_message} can tell.

    A body qualifies when it has no backslash (so every quote delimits a string and no
    key is spelt with escapes), a single ``{`` (no nested object, so every key is the top
    object's) and ``"userid"`` once (no duplicate key). If such a body is valid JSON, its
    ``userid`` member is the one found here; whether it is valid, and of a known type,
    is left to L{parse_message} when a stream or a replay needs the message.
    """
    if b"\\" in body or body.count(b"{") != 1 or body.count(b'"userid"') != 1:
        return None
    found = _USERID_MEMBER.search(body)
    return None if found is None else found[1].decode("ascii").lower()


def parse_message(body: bytes) -> Message:
    """Validate a message body and build its event data, or raise L{InvalidMessage}."""
    try:
        document = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidMessage("body is not UTF-8", "not_json") from None
    except RecursionError:
        raise InvalidMessage("JSON nested too deeply", "not_json") from None
    except ValueError as error:
        raise InvalidMessage(f"invalid JSON: {error}", "not_json") from None
    if not isinstance(document, dict):
        raise InvalidMessage(f"JSON is a {_json_type_name(document)}, not an object", "not_json")
    kind = document.get("type")
    if kind is None:
        raise InvalidMessage("missing field 'type'", "unknown_type")
    schema = _REGISTRY.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise InvalidMessage(f"unknown type {str(kind)[:64]!r}", "unknown_type")
    userid = document.get("userid")
    if not isinstance(userid, str) or not is_uuid(userid):
        raise InvalidMessage("field 'userid' is not a UUID", "bad_recipient")
    topic = document.get("topic")
    if topic is not None and (not isinstance(topic, str) or not is_uuid(topic)):
        raise InvalidMessage("field 'topic' is not a UUID", "bad_recipient")
    for field, expected in schema.required_fields.items():
        if field not in document:
            raise InvalidMessage(f"missing field {field!r}", "bad_field")
        if not _matches(document[field], expected):
            raise InvalidMessage(
                f"field {field!r} is a {_json_type_name(document[field])}, "
                f"expected {expected.__name__}",
                "bad_field",
            )
    # Compact, ASCII-only JSON has no line breaks at all, so the data of one
    # message is always exactly one ``data:`` line, whatever its strings hold.
    data = json.dumps(document, separators=(",", ":")).encode("ascii")
    return Message(
        type=kind,
        userid=userid.lower(),
        topic=topic.lower() if topic is not None else None,
        data=data,
    )
