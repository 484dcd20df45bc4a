"""TLS material: the browser-facing server context and the RabbitMQ client identity.

Keys and certificates are handed to pyOpenSSL as ``cryptography`` objects: pyOpenSSL 26
deprecates its own ``X509``/``PKey`` types there, and with warnings as errors that breaks TLS.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)

from ._config import ConfigError

__all__ = [
    "BROWSER_TLS12_CIPHERS",
    "POSTGRES_CA_FILE",
    "RABBITMQ_CA_FILE",
    "RABBITMQ_CLIENT_CERT_FILE",
    "RABBITMQ_CLIENT_KEY_FILE",
    "SERVER_CA_FILE",
    "SERVER_CERT_FILE",
    "SERVER_KEY_FILE",
    "rabbitmq_client_tls",
    "server_identity",
]

SERVER_CERT_FILE = "cert.pem"
SERVER_KEY_FILE = "key.pem"
SERVER_CA_FILE = "ca.pem"
RABBITMQ_CLIENT_CERT_FILE = "server_certificate.pem"
RABBITMQ_CLIENT_KEY_FILE = "server_key.pem"
RABBITMQ_CA_FILE = "ca_certificate.pem"
POSTGRES_CA_FILE = "postgres_ca.crt"

# TLS 1.2 suites offered to browsers: forward secret (ECDHE) and AEAD (AES-GCM,
# ChaCha20-Poly1305) only, in the order of Mozilla's "intermediate" server configuration
# (its DHE suites left out: browsers do not need them). No CBC, no CCM. TLS 1.3 suites
# are all AEAD and not affected by this list.
BROWSER_TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


def _read(certs_dir: Path, name: str) -> bytes:
    try:
        return (certs_dir / name).read_bytes()
    except OSError as error:
        raise ConfigError(f"SSE_CERTS_DIR: cannot read {name}: {error.strerror}") from None


def _certificates(certs_dir: Path, name: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read(certs_dir, name))
    except ValueError:
        raise ConfigError(f"SSE_CERTS_DIR: {name} holds no PEM certificate") from None
    return certificates


def _private_key(certs_dir: Path, name: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(_read(certs_dir, name), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"SSE_CERTS_DIR: {name} is not an unencrypted PEM private key") from None


def _identity(
    certs_dir: Path, cert_name: str, key_name: str
) -> tuple[x509.Certificate, PrivateKeyTypes, list[x509.Certificate]]:
    leaf, *chain = _certificates(certs_dir, cert_name)
    key = _private_key(certs_dir, key_name)
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    encoding = serialization.Encoding.DER
    if key.public_key().public_bytes(encoding, public) != leaf.public_key().public_bytes(
        encoding, public
    ):
        raise ConfigError(f"SSE_CERTS_DIR: {key_name} does not match {cert_name}")
    return leaf, key, chain


def server_identity(certs_dir: Path) -> tuple[CertificateOptions, x509.Certificate]:
    """Context for the browser-facing port (TLS 1.2+ with ECDHE and AEAD suites only, full
    chain, ALPN h2 then http/1.1, session tickets) and the certificate it serves.

    ``ca.pem`` is optional and, when present, sent as the intermediate chain after
    whatever chain ``cert.pem`` already carries.

    Session tickets (RFC 5077 in TLS 1.2, PSK tickets in TLS 1.3) let a browser that comes
    back to the same process skip the certificate and its signature (TLS 1.3 still runs an
    ECDHE exchange, for forward secrecy). They are stateless: the session travels in the
    ticket, encrypted under keys OpenSSL draws at random for each context, so the server
    keeps nothing per session. The keys are neither shared nor persisted (pyOpenSSL cannot
    set them): a ticket resumes only on the process and context that issued it, and anywhere
    else the browser gets a full handshake, as without tickets.
    """
    leaf, key, chain = _identity(certs_dir, SERVER_CERT_FILE, SERVER_KEY_FILE)
    if (certs_dir / SERVER_CA_FILE).exists():
        chain += _certificates(certs_dir, SERVER_CA_FILE)
    options = CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=leaf,  # type: ignore[arg-type]
        extraCertChain=chain,  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(BROWSER_TLS12_CIPHERS),
        acceptableProtocols=[b"h2", b"http/1.1"],
        enableSessionTickets=True,
    )
    return options, leaf


def rabbitmq_client_tls(certs_dir: Path, hostname: str) -> IOpenSSLClientConnectionCreator:
    """Client TLS toward RabbitMQ: our client certificate, its CA, its hostname verified."""
    leaf, key, chain = _identity(certs_dir, RABBITMQ_CLIENT_CERT_FILE, RABBITMQ_CLIENT_KEY_FILE)
    authorities = [
        Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))
        for certificate in _certificates(certs_dir, RABBITMQ_CA_FILE)
    ]
    return optionsForClientTLS(
        hostname,
        trustRoot=trustRootFromCertificates(authorities),
        extraCertificateOptions={
            "privateKey": key,
            "certificate": leaf,
            "extraCertChain": chain,
            "raiseMinimumTo": TLSVersion.TLSv1_2,
        },
    )
