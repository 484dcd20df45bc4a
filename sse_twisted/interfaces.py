"""The seams between the web front and its backends."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = ["BackendBusy", "BackendUnavailable", "IAuthenticator"]


class BackendUnavailable(Exception):
    """A backend could not answer in time; the caller should ask the client to come back."""


class BackendBusy(BackendUnavailable):
    """Too many checks wait for the backend already: refused at once, without asking it."""


class IAuthenticator(Interface):
    """Decides whether a (userid, nonce) pair may open a stream."""

    connected = Attribute("True while the backend can answer queries.")

    def is_subscriber(userid: str, nonce: str) -> Deferred[bool]:
        """Fire with whether the pair is known; fail with L{BackendUnavailable} when the
        backend cannot answer (down, reconnecting, timed out) or L{BackendBusy} when too
        many checks wait for it already. Cancelling a check not yet sent to the backend
        withdraws it."""

    def costs_no_query(userid: str, nonce: str) -> bool:
        """Whether checking the pair now would send no new backend query: it is granted
        from a cache, or joins a check of the same pair already in flight."""
