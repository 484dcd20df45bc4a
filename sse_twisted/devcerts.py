"""Development PKI: one local CA and the leaf certificates every component needs.

``python -m sse_twisted.devcerts DIR`` fills ``DIR`` with the files named by
:data:`DEV_CERTIFICATE_FILES`. Existing files are never overwritten, so the command is safe to
run on every start of a development environment. Keys are ECDSA P-256, signatures SHA-256.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ._tls import (
    POSTGRES_CA_FILE,
    RABBITMQ_CA_FILE,
    RABBITMQ_CLIENT_CERT_FILE,
    RABBITMQ_CLIENT_KEY_FILE,
    SERVER_CA_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
)

__all__ = [
    "DEFAULT_HOSTNAMES",
    "DEV_CERTIFICATE_FILES",
    "CertificateAuthority",
    "DevCertificateError",
    "DevCertificateFiles",
    "create_certificate_authority",
    "ensure_dev_certificates",
    "issue_certificate",
    "load_certificate_authority",
    "write_certificate",
    "write_private_key",
]

DEFAULT_HOSTNAMES: tuple[str, ...] = (
    "localhost",
    "127.0.0.1",
    "::1",
    "sse",
    "rabbitmq",
    "postgres",
)

# Both lifetimes stay under Apple's 825-day ceiling for TLS server certificates; the backdate
# tolerates clocks of containers that lag the host.
_CA_LIFETIME = datetime.timedelta(days=820)
_LEAF_LIFETIME = datetime.timedelta(days=365)
_BACKDATE = datetime.timedelta(hours=1)


@dataclass(frozen=True)
class DevCertificateFiles:
    """Names of the development PKI files, all kept in one directory."""

    ca_certificate: str = "dev_ca.pem"
    ca_key: str = "dev_ca_key.pem"
    browser_certificate: str = SERVER_CERT_FILE
    browser_key: str = SERVER_KEY_FILE
    browser_chain: str = SERVER_CA_FILE
    rabbitmq_client_certificate: str = RABBITMQ_CLIENT_CERT_FILE
    rabbitmq_client_key: str = RABBITMQ_CLIENT_KEY_FILE
    rabbitmq_ca: str = RABBITMQ_CA_FILE
    postgres_ca: str = POSTGRES_CA_FILE
    rabbitmq_server_certificate: str = "rabbitmq_certificate.pem"
    rabbitmq_server_key: str = "rabbitmq_key.pem"
    postgres_server_certificate: str = "postgres_server.crt"
    postgres_server_key: str = "postgres_server.key"

    def all_names(self) -> tuple[str, ...]:
        """Every file name of the layout."""
        return astuple(self)

    def leaf_pairs(self) -> tuple[tuple[str, str, bool], ...]:
        """``(certificate, key, is_client)`` for every leaf the CA signs."""
        return (
            (self.browser_certificate, self.browser_key, False),
            (self.rabbitmq_client_certificate, self.rabbitmq_client_key, True),
            (self.rabbitmq_server_certificate, self.rabbitmq_server_key, False),
            (self.postgres_server_certificate, self.postgres_server_key, False),
        )

    def ca_copies(self) -> tuple[str, ...]:
        """Names under which components expect the CA certificate."""
        return (self.browser_chain, self.rabbitmq_ca, self.postgres_ca)


DEV_CERTIFICATE_FILES = DevCertificateFiles()


class DevCertificateError(Exception):
    """The directory holds a partial PKI that cannot be completed consistently."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA certificate with the key that signs leaves under it."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Signatures only: a leaf's handshakes, and for a CA its certificates and CRLs too."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


def create_certificate_authority(common_name: str) -> CertificateAuthority:
    """A new self-signed CA that may only sign leaf certificates (path length 0)."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = private_key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _BACKDATE)
        .not_valid_after(_now() + _CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(private_key, hashes.SHA256())
    )
    return CertificateAuthority(certificate, private_key)


def _subject_alternative_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for hostname in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
        except ValueError:
            names.append(x509.DNSName(hostname))
    return names


def issue_certificate(
    authority: CertificateAuthority,
    hostnames: Sequence[str],
    *,
    client: bool = False,
    lifetime: datetime.timedelta = _LEAF_LIFETIME,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate and its new key for ``hostnames``, signed by ``authority``, valid
    for ``lifetime`` (a year unless told).

    Every leaf may serve TLS (serverAuth); ``client=True`` adds clientAuth. Hostnames that
    parse as IP addresses become IP address SANs, the rest DNS SANs; the first one is also
    the subject common name.
    """
    if not hostnames:
        raise ValueError("a certificate needs at least one hostname")
    private_key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(authority.certificate.subject)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - _BACKDATE)
        .not_valid_after(_now() + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(_subject_alternative_names(hostnames)), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.private_key.public_key()),
            critical=False,
        )
        .sign(authority.private_key, hashes.SHA256())
    )
    return certificate, private_key


def _create_file(path: Path, content: bytes, mode: int) -> None:
    # O_EXCL makes "never overwrite" hold even against a concurrent run, and creating the
    # file with its final mode means a key is never readable by others, not even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have removed bits we asked for
        file.write(content)


def write_certificate(path: Path, certificate: x509.Certificate) -> None:
    """Write ``certificate`` as PEM to a new file with mode 0644; an existing file is an error."""
    _create_file(path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)


def write_private_key(path: Path, private_key: ec.EllipticCurvePrivateKey) -> None:
    """Write ``private_key`` as unencrypted PKCS#8 PEM to a new file with mode 0600.

    PostgreSQL refuses to start with a key file that group or others can read.
    """
    content = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create_file(path, content, 0o600)


def load_certificate_authority(certificate_path: Path, key_path: Path) -> CertificateAuthority:
    """Read back a CA written by :func:`write_certificate` and :func:`write_private_key`."""
    certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
    private_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise DevCertificateError(f"{key_path} is not an elliptic curve key")
    return CertificateAuthority(certificate, private_key)


def ensure_dev_certificates(
    directory: Path, hostnames: Sequence[str] = DEFAULT_HOSTNAMES
) -> list[Path]:
    """Create whichever files of the development PKI are missing; return their paths.

    An empty directory gets a new CA. Otherwise the existing CA signs any missing leaf, so
    ``dev_ca_key.pem`` may be deleted once all leaves exist, but is required to add one.
    A leaf with only one of its certificate and key present is an error rather than a
    silent replacement of the other half.
    """
    files = DEV_CERTIFICATE_FILES
    directory.mkdir(parents=True, exist_ok=True)
    ca_certificate_path = directory / files.ca_certificate
    ca_key_path = directory / files.ca_key
    missing_leaves = []
    for certificate_name, key_name, client in files.leaf_pairs():
        certificate_path, key_path = directory / certificate_name, directory / key_name
        if certificate_path.exists() != key_path.exists():
            raise DevCertificateError(
                f"only one of {certificate_path} and {key_path} exists; delete the other "
                f"to have both issued again"
            )
        if not certificate_path.exists():
            missing_leaves.append((certificate_path, key_path, client))

    created: list[Path] = []
    missing_copies = [name for name in files.ca_copies() if not (directory / name).exists()]
    if not missing_leaves and not missing_copies:
        # Complete, whoever made it: real certificates need no development CA.
        return created
    if not any((directory / name).exists() for name in files.all_names()):
        new_authority = create_certificate_authority("sse-twisted development CA")
        write_certificate(ca_certificate_path, new_authority.certificate)
        write_private_key(ca_key_path, new_authority.private_key)
        created += [ca_certificate_path, ca_key_path]
    elif not ca_certificate_path.exists():
        raise DevCertificateError(
            f"{ca_certificate_path} is missing but other development certificates exist; "
            f"empty {directory} to start a new PKI"
        )
    elif missing_leaves and not ca_key_path.exists():
        raise DevCertificateError(
            f"{ca_key_path} is needed to issue "
            f"{', '.join(str(path) for path, _, _ in missing_leaves)}; restore it or "
            f"empty {directory} to start a new PKI"
        )

    if missing_leaves:
        authority = load_certificate_authority(ca_certificate_path, ca_key_path)
        for certificate_path, key_path, client in missing_leaves:
            certificate, private_key = issue_certificate(authority, hostnames, client=client)
            write_certificate(certificate_path, certificate)
            write_private_key(key_path, private_key)
            created += [certificate_path, key_path]

    ca_certificate = x509.load_pem_x509_certificate(ca_certificate_path.read_bytes())
    for name in missing_copies:
        path = directory / name
        write_certificate(path, ca_certificate)
        created.append(path)
    return created


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sse_twisted.devcerts",
        description="Create the development certificates missing in DIRECTORY (a local CA "
        "and a leaf for each component); existing files are never overwritten.",
    )
    parser.add_argument("directory", metavar="DIRECTORY", type=Path)
    return parser


def main(arguments: Sequence[str]) -> int:
    """Command line entry point: ``python -m sse_twisted.devcerts DIRECTORY``."""
    directory: Path = _parser().parse_args(arguments).directory
    try:
        created = ensure_dev_certificates(directory)
    except DevCertificateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in created:
        print(f"created {path}")
    if not created:
        print(f"nothing missing in {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
