"""The in-memory fakes of tests/fakes.py provide the interfaces they stand in for."""

from __future__ import annotations

import pytest
from zope.interface.verify import verifyObject

from sse_twisted.interfaces import IAuthenticator
from tests.fakes import ImmediateAuthenticator, PendingAuthenticator, ScriptedAuthenticator


@pytest.mark.parametrize(
    "fake", [ImmediateAuthenticator(), PendingAuthenticator(), ScriptedAuthenticator()]
)
def test_each_fake_authenticator_provides_the_whole_interface(fake: IAuthenticator) -> None:
    assert verifyObject(IAuthenticator, fake)
