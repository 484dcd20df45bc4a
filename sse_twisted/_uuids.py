"""The two UUID shapes the server checks, written once.

A subscribe path carries exactly lowercase v4 UUIDs (what the issuing application makes),
checked on the raw bytes Twisted routes on. A message's ``userid``/``topic`` and a
revocation's payload come from other systems and may be any version, in either case.
"""

from __future__ import annotations

import re

__all__ = ["is_uuid", "is_v4_uuid"]

_V4_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_ANY_UUID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)


def is_v4_uuid(segment: bytes) -> bool:
    """Whether ``segment`` is exactly a lowercase v4 UUID (nothing before or after)."""
    return _V4_UUID.fullmatch(segment) is not None


def is_uuid(text: str) -> bool:
    """Whether ``text`` is exactly a UUID of any version, in upper or lower case."""
    return _ANY_UUID.fullmatch(text) is not None
