"""What the consumer relies on in pika beyond L{TwistedChannel}'s Deferred API.

The stream is consumed on a channel of pika's callback API (``pika.channel.Channel``),
opened through the connection the Twisted adapter drives (``TwistedChannel.connection``),
so that deliveries do not each go through a Deferred queue. Checked against pika 1.4.4;
each test names what changed if it fails.
"""

from __future__ import annotations

import inspect

import pika.channel
import pika.connection
from pika.adapters.twisted_connection import TwistedChannel


def _parameters(function: object) -> set[str]:
    return set(inspect.signature(function).parameters)  # type: ignore[arg-type]


def test_a_twisted_channel_leads_to_its_pika_connection() -> None:
    connection = getattr(TwistedChannel, "connection", None)
    assert isinstance(connection, property), (
        "pika's TwistedChannel has no `connection` property any more: "
        "StreamConsumerService._consume_on opens its channel through it"
    )


def test_a_pika_connection_opens_a_callback_channel() -> None:
    assert {"channel_number", "on_open_callback"} <= _parameters(
        pika.connection.Connection.channel
    ), "pika.connection.Connection.channel(on_open_callback=...) changed"


def test_the_callback_channel_consumes_with_a_message_callback_and_a_consume_ok_callback() -> None:
    consume = _parameters(pika.channel.Channel.basic_consume)
    assert {"queue", "on_message_callback", "auto_ack", "arguments", "callback"} <= consume, (
        "pika.channel.Channel.basic_consume no longer takes on_message_callback/callback"
    )
    assert "callback" in _parameters(pika.channel.Channel.basic_qos), (
        "pika.channel.Channel.basic_qos no longer takes a completion callback"
    )


def test_the_callback_channel_reports_its_close_and_a_cancel_by_the_broker() -> None:
    for name in ("add_on_close_callback", "add_on_cancel_callback", "basic_ack", "close"):
        assert callable(getattr(pika.channel.Channel, name, None)), (
            f"pika.channel.Channel.{name} is gone: the consumer's channel needs it"
        )
