"""Certificate renewal as an ACME client does it, from the development CA."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from cryptography import x509

from sse_twisted.devcerts import (
    DEV_CERTIFICATE_FILES,
    issue_certificate,
    load_certificate_authority,
    write_certificate,
    write_private_key,
)


def renew_certificate(
    certs_dir: Path, *, with_key: bool = True, days: int = 90
) -> x509.Certificate:
    """Issue a new localhost certificate for ``days`` from the dev CA and move it over
    cert.pem (and its key over key.pem), each by an atomic rename, as ACME clients do."""
    files = DEV_CERTIFICATE_FILES
    authority = load_certificate_authority(
        certs_dir / files.ca_certificate, certs_dir / files.ca_key
    )
    certificate, key = issue_certificate(
        authority, ["localhost", "127.0.0.1"], lifetime=datetime.timedelta(days=days)
    )
    if with_key:
        write_private_key(certs_dir / "key.pem.new", key)
        os.replace(certs_dir / "key.pem.new", certs_dir / "key.pem")
    write_certificate(certs_dir / "cert.pem.new", certificate)
    os.replace(certs_dir / "cert.pem.new", certs_dir / "cert.pem")
    return certificate
