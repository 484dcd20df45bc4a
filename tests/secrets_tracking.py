"""Fresh identifiers and the secrets the suite hands to servers, remembered with every line
servers logged: at the end of the session tests/conftest.py fails the run if any secret is in
any line."""

from __future__ import annotations

import uuid

USED_SECRETS: set[str] = set()
LOGGED_TEXT: list[str] = []


def new_uuid() -> str:
    """A fresh lowercase v4 UUID."""
    return str(uuid.uuid4())


def new_token() -> str:
    """A fresh subscriber token (a v4 UUID), remembered as a secret no log may contain."""
    token = new_uuid()
    USED_SECRETS.add(token)
    return token


def leaked_secrets(texts: list[str], secrets: set[str]) -> dict[str, str]:
    """Each secret found in ``texts`` (case-insensitively), with the line it is in."""
    found: dict[str, str] = {}
    lines = [line for text in texts for line in text.splitlines()]
    lowered = [line.lower() for line in lines]
    for secret in secrets:
        for line, low in zip(lines, lowered, strict=True):
            if secret.lower() in low:
                found[secret] = line
                break
    return found


def new_password() -> str:
    """A fresh password, remembered as a secret no log may contain."""
    password = f"pw-{uuid.uuid4().hex}"
    USED_SECRETS.add(password)
    return password
