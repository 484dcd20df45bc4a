"""The seams between the web front and its backends."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = ["BackendUnavailable", "IAuthenticator"]


class BackendUnavailable(Exception):
    """A backend could not answer in time; the caller should ask the client to come back."""


class IAuthenticator(Interface):
    """Decides whether a (userid, nonce) pair may open a stream."""

    connected = Attribute("True while the backend can answer queries.")

    def is_subscriber(userid: str, nonce: str) -> Deferred[bool]:
        """Fire with whether the pair is known; fail with L{BackendUnavailable} when the
        backend cannot answer (down, reconnecting, timed out)."""
