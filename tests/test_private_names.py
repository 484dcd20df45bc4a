"""The guard on the private names of dependencies that sse_twisted uses, where they have no
public equivalent: each is used in one module, whose comment says why and which versions
were checked, and pyproject.toml pins those versions' range. When a new release renames or
drops one, this fails naming it and the module to revisit."""

from __future__ import annotations

import pika
import twisted.web._http2
import twisted.web.http
from pika.adapters.twisted_connection import TwistedProtocolConnection
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel

from sse_twisted._channel import DrainingChannelProtocol


def _twisted_names() -> list[str]:
    missing = []
    if not callable(getattr(HTTPChannel, "_respondToBadRequestAndDisconnect", None)):
        missing.append("HTTPChannel._respondToBadRequestAndDisconnect (overridden)")
    if not isinstance(getattr(twisted.web.http, "_GenericHTTPChannelProtocol", None), type):
        missing.append("twisted.web.http._GenericHTTPChannelProtocol")
    if not isinstance(
        getattr(DrainingChannelProtocol(HTTPChannel()), "_channel", None), HTTPChannel
    ):
        missing.append("_GenericHTTPChannelProtocol._channel")
    from twisted.web._http2 import H2Connection

    connection = H2Connection(Clock())
    if not isinstance(getattr(connection, "_streamCleanupCallbacks", None), dict):
        missing.append("H2Connection._streamCleanupCallbacks")
    if not callable(getattr(getattr(connection, "conn", None), "close_connection", None)):
        missing.append("H2Connection.conn (an h2 connection)")
    # The sending loop BatchingH2Connection replaces, and what _switch_to_h2 repeats.
    for name in (
        "priority",
        "_outboundStreamQueues",
        "_stillProducing",
        "_consumerBlocked",
        "_sendingDeferred",
        "_reactor",
        "_requestDone",
        "_sendPrioritisedData",
        "remainingOutboundWindow",
        "streams",
    ):
        if not hasattr(connection, name):
            missing.append(f"H2Connection.{name}")
    if not hasattr(twisted.web._http2, "_END_STREAM_SENTINEL"):
        missing.append("twisted.web._http2._END_STREAM_SENTINEL")
    protocol = DrainingChannelProtocol(HTTPChannel())
    for name in ("_requestFactory", "_site", "_factory", "_timeOut", "_callLater"):
        if not hasattr(protocol, name):
            missing.append(f"_GenericHTTPChannelProtocol.{name}")
    if getattr(protocol, "_negotiatedProtocol", "missing") is not None:
        missing.append("_GenericHTTPChannelProtocol._negotiatedProtocol")
    connected = HTTPChannel()
    connected.makeConnection(StringTransport())
    if not hasattr(connected, "_networkProducer"):
        missing.append("HTTPChannel._networkProducer")
    return [
        f"Twisted {twisted.__version__} has no {name}: see sse_twisted/_channel.py"
        for name in missing
    ]


def _pika_names() -> list[str]:
    connection = TwistedProtocolConnection(pika.ConnectionParameters(), custom_reactor=Clock())
    impl = getattr(connection, "_impl", None)
    if impl is None or not hasattr(impl, "_error"):
        return [
            f"pika {pika.__version__} has no TwistedProtocolConnection._impl._error: "
            "see _StreamConnection in sse_twisted/_consumer.py"
        ]
    return []


def test_the_private_names_of_dependencies_sse_twisted_uses_are_still_there() -> None:
    missing = _twisted_names() + _pika_names()
    assert not missing, "\n".join(missing)
