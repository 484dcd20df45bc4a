"""The URL tree: ``/subscribe/...`` and the other public paths, a plain 404 for the rest,
and the plain-text answer every refusal uses."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["plain_answer", "root_resource"]


def plain_answer(request: Request, status: int, reason: str) -> bytes:
    """Set ``status`` on ``request`` and return ``reason`` as its uncached text body."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return reason.encode("utf-8") + b"\n"


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return plain_answer(request, 404, "not found")


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()


def root_resource(subscribe: Resource) -> Resource:
    """The URL tree: ``/subscribe/...``; every other path is a plain 404."""
    root = _Root()
    root.putChild(b"subscribe", subscribe)
    return root
