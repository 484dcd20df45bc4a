"""Request paths as Twisted routes them, and as a log line may show them.

Twisted splits C{request.path} (the target before C{?}) at C{/} after its first byte and
percent-decodes each segment (C{twisted.web.server.Request.process}), then routes on the
decoded segments: C{/%73ubscribe/...} reaches the subscribe resource as C{/subscribe/...}
does. What a log line shows is decided on those same decoded segments.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from ._uuids import is_v4_uuid

__all__ = ["MASK", "loggable_path"]

MASK = "****"
# A segment of any other path is shown only when it cannot hold a token, whole or in part,
# however spelled: no digit, no percent-escape, and a letter that is not a hex digit. Such
# segments are what scanners and typos send (/favicon.ico, /SUBSCRIBE, /wp-admin).
_PLAIN_SEGMENT = re.compile(rb"[A-Za-z._~-]{0,32}")
_NOT_HEX_LETTER = re.compile(rb"[g-zG-Z]")


def _shown(segment: bytes) -> bool:
    return segment == b"" or (
        _PLAIN_SEGMENT.fullmatch(segment) is not None
        and _NOT_HEX_LETTER.search(segment) is not None
    )


def loggable_path(path: bytes, authenticated: bool = False) -> str:
    """``path`` as log lines may carry it.

    The path of an C{authenticated} subscriber (decoded segments ``subscribe`` and three v4
    UUIDs, the last two a known pair) is shown as sent with its token masked, and its topic
    too if it repeats the token. On any other path every segment that could carry a
    credential is masked, topic and userid included: a token is there too when a segment is
    missing or one too many, or two are swapped. A path that does not start with C{/} is
    masked whole, as Twisted routes on it from its second byte.
    """
    if not path.startswith(b"/"):
        return MASK
    raw = path[1:].split(b"/")
    decoded = [unquote_to_bytes(segment) for segment in raw]
    if (
        authenticated
        and len(decoded) == 4
        and decoded[0] == b"subscribe"
        and all(map(is_v4_uuid, decoded[1:]))
    ):
        # These decode to ASCII names, so their raw form is plain ASCII too.
        shown = [segment.decode("ascii") for segment in raw[:3]] + [MASK]
        if decoded[1] == decoded[3]:
            shown[1] = MASK
    else:
        shown = [segment.decode("ascii") if _shown(segment) else MASK for segment in raw]
    return "/" + "/".join(shown)
