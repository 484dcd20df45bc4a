"""The browser-facing port accepts, in TLS 1.2, only ECDHE suites with AES-GCM or
ChaCha20-Poly1305: every TLS 1.2 suite this OpenSSL knows is offered alone, one at a time."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from sse_twisted._tls import SERVER_CERT_FILE, SERVER_KEY_FILE, server_identity
from tests.backends import Pki

ACCEPTED_WITH_ECDSA = {
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
ACCEPTED_WITH_RSA = {
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-RSA-CHACHA20-POLY1305",
}


def _every_tls12_suite() -> list[str]:
    """Every suite the local OpenSSL can offer below TLS 1.3 (CBC, CCM, RSA key exchange...)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return [cipher["name"] for cipher in context.get_ciphers() if cipher["protocol"] != "TLSv1.3"]


def _accepts(port: int, suite: str) -> bool:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(f"{suite}:@SECLEVEL=0")
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw) as connection,
        ):
            return connection.cipher()[0] == suite  # type: ignore[index]
    except ssl.SSLError:
        return False


def _accepted(port: int) -> set[str]:
    return {suite for suite in _every_tls12_suite() if _accepts(port, suite)}


def _rsa_identity(directory: Path) -> Path:
    """``directory`` with a self-signed RSA 2048 certificate for localhost."""
    directory.mkdir()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (directory / SERVER_CERT_FILE).write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory


async def _accepted_by_server_of(certs_dir: Path) -> set[str]:
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Protocol), server_identity(certs_dir)[0], interface="127.0.0.1"
    )
    try:
        return await deferToThread(_accepted, port.getHost().port)
    finally:
        await port.stopListening()


def test_the_local_openssl_offers_cbc_and_ccm_suites_to_refuse() -> None:
    """The check below means something only if the client really offers the weak suites."""
    offered = set(_every_tls12_suite())
    assert {"ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384"} < (
        offered
    )
    assert any("CCM" in suite for suite in offered)


@pytest_twisted.ensureDeferred
async def test_tls12_with_an_ecdsa_certificate_accepts_only_ecdhe_with_gcm_or_chacha20(
    pki: Pki,
) -> None:
    assert await _accepted_by_server_of(pki.directory) == ACCEPTED_WITH_ECDSA


@pytest_twisted.ensureDeferred
async def test_tls12_with_an_rsa_certificate_accepts_only_ecdhe_with_gcm_or_chacha20(
    tmp_path: Path,
) -> None:
    assert await _accepted_by_server_of(_rsa_identity(tmp_path / "rsa")) == ACCEPTED_WITH_RSA


@pytest_twisted.ensureDeferred
async def test_tls13_is_still_accepted(pki: Pki) -> None:
    port = reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Protocol), server_identity(pki.directory)[0], interface="127.0.0.1"
    )

    def version() -> str:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with (
            socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as raw,
            context.wrap_socket(raw) as connection,
        ):
            return connection.version() or ""

    try:
        assert await deferToThread(version) == "TLSv1.3"
    finally:
        await port.stopListening()
