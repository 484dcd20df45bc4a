"""The browser-facing TLS identity, reloaded from disk on ``SIGHUP`` without a restart.

A reload builds a whole new context from ``SSE_CERTS_DIR`` and swaps it in only if every
file reads and the key matches the certificate. New connections get the new certificate;
open streams keep the TLS session they have. A renewal caught half written (a new
``cert.pem`` beside the old ``key.pem``) is refused with one log line, the current
certificate stays, and the next ``SIGHUP`` tries again.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL.SSL import Connection, Error
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import CertificateOptions
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from ._config import ConfigError
from ._tls import server_identity

__all__ = ["ReloadOnHangup", "ReloadableServerTLS"]


def _certificate_log_fields(leaf: x509.Certificate) -> dict[str, str]:
    """Log fields that tell an operator which certificate is being served."""
    return {
        "subject": leaf.subject.rfc4514_string(),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "sha256": leaf.fingerprint(hashes.SHA256()).hex(),
    }


def _load(certs_dir: Path) -> tuple[CertificateOptions, x509.Certificate]:
    """Read and check the files, and build the OpenSSL context (in a worker thread)."""
    options, leaf = server_identity(certs_dir)
    options.getContext()
    return options, leaf


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """Hands each new TLS connection the current server context; L{reload} replaces it.

    ``not_after`` (Unix time) is the served certificate's expiry; ``reloads`` counts
    reloads by outcome, ``ok`` or ``refused``. Both are exposed as metrics.
    """

    log = Logger()

    def __init__(self, certs_dir: Path, reactor: Any) -> None:
        self._certs_dir = certs_dir
        self._reactor = reactor
        self._options, leaf = server_identity(certs_dir)
        self._lock = DeferredLock()
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.reloads = {"ok": 0, "refused": 0}
        self.log.info(
            "serving TLS certificate {subject}, valid until {not_after}, sha256 {sha256}",
            **_certificate_log_fields(leaf),
        )

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> Connection:  # noqa: N803
        """A connection on the context current when the client connected."""
        # Not CertificateOptions.serverConnectionForTLS: it also gives every connection a
        # client-side ALPN offer, which a server never sends (the context's select callback
        # negotiates), at a measurable cost in a connection storm (bench/RESULTS.md, item 8).
        return Connection(self._options.getContext(), None)

    def reload(self) -> Deferred[bool]:
        """Load the files again; swap them in if they are whole. Fires with whether it did.

        Reloads run one at a time, so the last signal's files are the ones that stay.
        """
        return self._lock.run(lambda: Deferred.fromCoroutine(self._reload()))

    async def _reload(self) -> bool:
        # File reads and key parsing stay off the reactor thread.
        pool = self._reactor.getThreadPool()
        try:
            self._options, leaf = await deferToThreadPool(
                self._reactor, pool, _load, self._certs_dir
            )
        except (ConfigError, Error) as error:
            self.reloads["refused"] += 1
            self.log.error(
                "TLS reload refused, still serving the previous certificate: {reason}",
                reason=str(error),
            )
            return False
        self.not_after = leaf.not_valid_after_utc.timestamp()
        self.reloads["ok"] += 1
        self.log.info(
            "TLS certificate reloaded: {subject}, valid until {not_after}, sha256 {sha256}",
            **_certificate_log_fields(leaf),
        )
        return True


class ReloadOnHangup(Service):
    """Calls C{reload} on ``SIGHUP`` (``kill -HUP``, ``docker kill -s HUP``)."""

    log = Logger()

    def __init__(self, reload: Callable[[], Deferred[bool]], reactor: Any) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        """Install the handler (replacing the default, which ends the process)."""
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def stopService(self) -> None:
        """Put back whatever handled ``SIGHUP`` before."""
        signal.signal(signal.SIGHUP, self._previous)
        super().stopService()

    def _received(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler may interrupt the reactor anywhere: hand over to its loop.
        self._reactor.callFromThread(self._hangup)

    def _hangup(self) -> None:
        self.log.info("SIGHUP: reloading the TLS certificate")
        self._reload().addErrback(lambda reason: self.log.failure("TLS reload failed", reason))
