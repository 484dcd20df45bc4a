"""The ``Server`` header: the software's name, without Twisted's name and version."""

from __future__ import annotations

from typing import AnyStr

from twisted.web.server import Request

__all__ = ["SERVER_NAME", "NamedServerRequest"]

SERVER_NAME = b"sse-twisted"


class NamedServerRequest(Request):
    """A request whose ``Server`` header is L{SERVER_NAME}.

    ``Request.process`` sets ``Server: TwistedWeb/<version>`` from a module constant and
    offers no other seam; a version helps an attacker pick exploits, and nobody else.
    """

    def setHeader(self, name: AnyStr, value: AnyStr) -> None:
        """Set a response header; ``Server`` is always L{SERVER_NAME}."""
        if name.lower() in (b"server", "server"):
            super().setHeader(b"server", SERVER_NAME)
            return
        super().setHeader(name, value)
