"""The browser-facing port serves the whole chain: a leaf signed by an intermediate CA, the
intermediate taken from ca.pem, verified by clients that trust only the root."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from sse_twisted._tls import server_identity
from sse_twisted.devcerts import (
    CertificateAuthority,
    create_certificate_authority,
    issue_certificate,
    write_certificate,
    write_private_key,
)


def _ca(
    name: str, path_length: int, issuer: CertificateAuthority | None = None
) -> CertificateAuthority:
    """A CA that may sign ``path_length`` levels of intermediates, signed by ``issuer`` or,
    without one, by itself (devcerts only makes self-signed CAs that sign leaves)."""
    template = create_certificate_authority(name)
    key: ec.EllipticCurvePrivateKey = template.private_key
    signer = issuer or CertificateAuthority(template.certificate, key)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(template.certificate.subject)
        .issuer_name(signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(template.certificate.not_valid_before_utc)
        .not_valid_after(template.certificate.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            template.certificate.extensions.get_extension_for_class(x509.KeyUsage).value,
            critical=True,
        )
        .sign(signer.private_key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, key)


def _layout(directory: Path, with_intermediate: bool) -> Path:
    """cert.pem (the leaf alone), key.pem, ca.pem (the intermediate), root.pem apart."""
    directory.mkdir()
    root = _ca("Test Root CA", path_length=1)
    intermediate = _ca("Test Intermediate CA", path_length=0, issuer=root)
    leaf, key = issue_certificate(intermediate, ["localhost"])
    write_certificate(directory / "cert.pem", leaf)
    write_private_key(directory / "key.pem", key)
    if with_intermediate:
        write_certificate(directory / "ca.pem", intermediate.certificate)
    write_certificate(directory / "root.pem", root.certificate)
    return directory / "root.pem"


def _serve_tls(certs: Path) -> Any:
    """A port on 127.0.0.1 whose TLS is the server's own, from the files in ``certs``."""
    return reactor.listenSSL(  # type: ignore[attr-defined]
        0, Factory.forProtocol(Protocol), server_identity(certs)[0], interface="127.0.0.1"
    )


def _handshake_trusting(root: Path, port: int) -> str:
    context = ssl.create_default_context(cafile=str(root))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        return connection.version() or ""


def _served_chain(root: Path, port: int) -> str:
    return subprocess.run(
        [
            *("openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"),
            *("-showcerts", "-CAfile", str(root), "-verify_hostname", "localhost"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    ).stdout


@pytest_twisted.ensureDeferred
async def test_leaf_and_intermediate_from_ca_pem_are_served_and_verify_against_the_root(
    tmp_path: Path,
) -> None:
    root = _layout(tmp_path / "certs", with_intermediate=True)
    port = _serve_tls(tmp_path / "certs")
    try:
        number = port.getHost().port
        assert (await deferToThread(_handshake_trusting, root, number)) in ("TLSv1.2", "TLSv1.3")
        output = await deferToThread(_served_chain, root, number)
        assert output.count("-----BEGIN CERTIFICATE-----") == 2, output
        assert " 0 s:CN = localhost" in output and " 1 s:CN = Test Intermediate CA" in output
        assert "Verify return code: 0 (ok)" in output
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_without_the_intermediate_a_client_trusting_only_the_root_refuses(
    tmp_path: Path,
) -> None:
    root = _layout(tmp_path / "certs", with_intermediate=False)
    port = _serve_tls(tmp_path / "certs")
    try:
        try:
            await deferToThread(_handshake_trusting, root, port.getHost().port)
        except ssl.SSLCertVerificationError as error:
            assert "unable to get local issuer certificate" in str(error)
        else:
            raise AssertionError("a chain without its intermediate verified")
    finally:
        await port.stopListening()
