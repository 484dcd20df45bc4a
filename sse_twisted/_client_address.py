"""The address of the client behind a request, believing only trusted reverse proxies.

Behind a proxy every TCP peer is the proxy. When the peer is one of the trusted proxies,
the client is the right-most address of ``X-Forwarded-For`` (or, when that header is absent,
of ``Forwarded: for=``) that is not itself a trusted proxy: entries further left were written
by the client and may be made up. A header that cannot be read gives the peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from twisted.web.iweb import IRequest

__all__ = ["Networks", "client_address", "forwarded_client"]

Networks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address
_EntryParser = Callable[[str], _Address | None]


def client_address(request: IRequest, trusted_proxies: Networks) -> str:
    """The real client address of ``request`` (the TCP peer unless a trusted proxy speaks)."""
    peer = str(getattr(request.getClientAddress(), "host", ""))
    if not trusted_proxies:
        return peer
    headers = request.requestHeaders
    return forwarded_client(
        peer,
        headers.getRawHeaders(b"x-forwarded-for"),
        headers.getRawHeaders(b"forwarded"),
        trusted_proxies,
    )


def forwarded_client(
    peer: str,
    x_forwarded_for: Sequence[bytes] | None,
    forwarded: Sequence[bytes] | None,
    trusted_proxies: Networks,
) -> str:
    """The client address given the peer and the raw header values (each may be repeated)."""
    if not _trusted(_parse(peer), trusted_proxies):
        return peer
    if x_forwarded_for:
        hops = _hops(x_forwarded_for, _parse)
    elif forwarded:
        hops = _hops(forwarded, _forwarded_for_entry)
    else:
        return peer
    if hops is None:
        return peer
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            return str(hop)
    # Every hop is a trusted proxy: the left-most one made the request.
    return str(hops[0]) if hops else peer


def _hops(values: Sequence[bytes], entry: _EntryParser) -> list[_Address] | None:
    """Every address of a comma-separated header, in order; None if one is unreadable."""
    hops = []
    for value in values:
        for element in value.decode("latin-1").split(","):
            address = entry(element.strip())
            if address is None:
                return None
            hops.append(address)
    return hops


def _forwarded_for_entry(element: str) -> _Address | None:
    """The ``for=`` parameter of one RFC 7239 element (``for=192.0.2.1;proto=https``)."""
    for pair in element.split(";"):
        name, _, value = pair.strip().partition("=")
        if name.strip().lower() == "for":
            return _parse(value.strip().strip('"'))
    return None


def _parse(text: str) -> _Address | None:
    """An address, also written with a port (``192.0.2.1:443``, ``[2001:db8::1]:443``)."""
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: _Address | None, trusted_proxies: Networks) -> bool:
    return address is not None and any(address in network for network in trusted_proxies)
