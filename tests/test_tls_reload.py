"""SIGHUP reloads the browser-facing certificate in a running twistd: new connections get
the renewed one, open streams keep flowing, and a renewal caught half written is refused."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.internet.threads import deferToThread

from tests.backends import Pki
from tests.browser import Browser
from tests.certificates import renew_certificate
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.twistd_processes import TwistdProcess, spawn_twistd
from tests.waiting import bounded, wait_for


def _served_certificate(port: int, ca: Path) -> x509.Certificate:
    """The certificate a new, verifying client is given."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        der = connection.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def served_certificate(port: int, ca: Path) -> x509.Certificate:
    return await deferToThread(_served_certificate, port, ca)


def _messages(process: TwistdProcess, start: str) -> list[dict[str, Any]]:
    return [line for line in process.lines if line["message"].startswith(start)]


async def _hangup(process: TwistdProcess, transport: Any, outcome: str) -> dict[str, Any]:
    """Send SIGHUP and return the log line that reports ``outcome`` of this reload."""
    seen = len(_messages(process, outcome))
    transport.signalProcess("HUP")
    await wait_for(lambda: len(_messages(process, outcome)) > seen, f"no {outcome!r} line")
    return _messages(process, outcome)[-1]


def _sha256(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


@pytest_twisted.ensureDeferred
async def test_sighup_serves_a_renewed_certificate_to_new_connections_and_open_streams_flow_on(
    tmp_path: Path,
    certs_dir: Path,
    pki: Pki,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    browser: Browser,
) -> None:
    userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
    process, transport = spawn_twistd(
        {**plaintext_environ, "SSE_CERTS_DIR": str(certs_dir)}, tmp_path
    )
    try:
        port = await bounded(process.port, 30)
        await bounded(process.consuming, 30)
        before = await served_certificate(port, pki.ca_certificate)
        [serving] = _messages(process, "serving TLS certificate")
        assert serving["sha256"] == _sha256(before)
        response, tab = await browser.open(
            f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}"
        )
        assert response.code == 200

        renewed = renew_certificate(certs_dir)
        reloaded = await _hangup(process, transport, "TLS certificate reloaded")

        assert reloaded["sha256"] == _sha256(renewed) != _sha256(before)
        assert reloaded["not_after"] == renewed.not_valid_after_utc.isoformat()
        after = await served_certificate(port, pki.ca_certificate)
        assert after.serial_number == renewed.serial_number
        # The stream opened before the reload is still open and still delivered to.
        await publish(5672, plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"], found_contract(userid))
        event = await tab.next_event()
        assert json.loads(event["data"]) == found_contract(userid)
        assert not tab.closed.called
    finally:
        await process.terminate()
    assert b"PRIVATE KEY" not in process.raw


@pytest_twisted.ensureDeferred
async def test_a_half_written_renewal_is_refused_on_sighup_and_the_current_certificate_stays(
    tmp_path: Path, certs_dir: Path, pki: Pki, plaintext_environ: dict[str, str]
) -> None:
    process, transport = spawn_twistd(
        {**plaintext_environ, "SSE_CERTS_DIR": str(certs_dir)}, tmp_path
    )
    try:
        port = await bounded(process.port, 30)
        before = await served_certificate(port, pki.ca_certificate)

        # The new certificate has landed, its key not yet.
        renewed = renew_certificate(certs_dir, with_key=False)
        refused = await _hangup(process, transport, "TLS reload refused")

        assert refused["@level"] == "error"
        assert refused["reason"] == "SSE_CERTS_DIR: key.pem does not match cert.pem"
        still = await served_certificate(port, pki.ca_certificate)
        assert still.serial_number == before.serial_number != renewed.serial_number
        assert not process.ended.called

        # The renewal completes; the next SIGHUP takes it.
        completed = renew_certificate(certs_dir)
        await _hangup(process, transport, "TLS certificate reloaded")
        now = await served_certificate(port, pki.ca_certificate)
        assert now.serial_number == completed.serial_number
    finally:
        await process.terminate()
    assert b"PRIVATE KEY" not in process.raw
