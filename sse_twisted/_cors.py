"""Cross-origin access to the subscribe URL: which page origins may open a stream, and the
answer to a browser's preflight."""

from __future__ import annotations

from twisted.web.server import Request

__all__ = ["CrossOrigin"]


class CrossOrigin:
    """The CORS policy for ``origins`` (``"*"`` among them allows every page)."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self._origins = origins

    def allow(self, request: Request) -> bool:
        """Set the CORS headers; False when the request's origin is not allowed."""
        if "*" in self._origins:
            request.setHeader(b"access-control-allow-origin", b"*")
            return True
        request.setHeader(b"vary", b"Origin")
        origin = request.getHeader(b"origin")
        if origin is None:
            return True
        if origin.decode("latin-1") not in self._origins:
            return False
        request.setHeader(b"access-control-allow-origin", origin)
        return True

    @staticmethod
    def preflight(request: Request) -> bytes:
        """Answer an ``OPTIONS`` preflight: GET with the two headers EventSource may send."""
        request.setResponseCode(204)
        request.setHeader(b"access-control-allow-methods", b"GET, OPTIONS")
        request.setHeader(b"access-control-allow-headers", b"Last-Event-ID, X-Request-ID")
        request.setHeader(b"access-control-max-age", b"86400")
        return b""
