"""The development PKI is sound and the test backends really enforce TLS."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
import uuid
from pathlib import Path

import pika
import pika.exceptions
import psycopg2
import pytest
from cryptography import x509
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from sse_twisted import devcerts
from sse_twisted.devcerts import (
    DEV_CERTIFICATE_FILES,
    DevCertificateError,
    create_certificate_authority,
    ensure_dev_certificates,
    issue_certificate,
    write_certificate,
    write_private_key,
)
from tests.backends import Pki, PostgresServer, RabbitMQServer, client_ssl_context

FILES = DEV_CERTIFICATE_FILES


def _load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _file_contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in directory.iterdir()}


class TestDevCertificates:
    def test_first_run_creates_the_whole_layout_and_second_run_nothing(
        self, tmp_path: Path
    ) -> None:
        directory = tmp_path / "certs"
        created = ensure_dev_certificates(directory)
        assert sorted(path.name for path in created) == sorted(FILES.all_names())
        before = _file_contents(directory)

        assert ensure_dev_certificates(directory) == []
        assert _file_contents(directory) == before

    def test_private_keys_are_private_and_certificates_world_readable(self, tmp_path: Path) -> None:
        ensure_dev_certificates(tmp_path)
        keys = {FILES.ca_key, *(key for _, key, _ in FILES.leaf_pairs())}
        for name in FILES.all_names():
            expected = 0o600 if name in keys else 0o644
            assert (tmp_path / name).stat().st_mode & 0o777 == expected, name

    def test_every_server_leaf_verifies_for_each_hostname_against_the_ca(
        self, tmp_path: Path
    ) -> None:
        ensure_dev_certificates(tmp_path)
        store = Store([_load_certificate(tmp_path / FILES.browser_chain)])
        subjects: list[DNSName | IPAddress] = [
            DNSName("localhost"),
            DNSName("rabbitmq"),
            IPAddress(ipaddress.ip_address("127.0.0.1")),
            IPAddress(ipaddress.ip_address("::1")),
        ]
        for certificate_name, _, _ in FILES.leaf_pairs():
            leaf = _load_certificate(tmp_path / certificate_name)
            for subject in subjects:
                verifier = PolicyBuilder().store(store).build_server_verifier(subject)
                verifier.verify(leaf, [])

    def test_only_the_rabbitmq_client_identity_may_authenticate_clients(
        self, tmp_path: Path
    ) -> None:
        ensure_dev_certificates(tmp_path)
        verifier = (
            PolicyBuilder()
            .store(Store([_load_certificate(tmp_path / FILES.ca_certificate)]))
            .build_client_verifier()
        )
        for certificate_name, _, client in FILES.leaf_pairs():
            leaf = _load_certificate(tmp_path / certificate_name)
            usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            assert (ExtendedKeyUsageOID.CLIENT_AUTH in usages) == client, certificate_name
            if client:
                verifier.verify(leaf, [])
            else:
                with pytest.raises(VerificationError):
                    verifier.verify(leaf, [])

    def test_a_deleted_leaf_is_reissued_by_the_existing_ca(self, tmp_path: Path) -> None:
        ensure_dev_certificates(tmp_path)
        (tmp_path / FILES.browser_certificate).unlink()
        (tmp_path / FILES.browser_key).unlink()

        created = ensure_dev_certificates(tmp_path)

        assert created == [tmp_path / FILES.browser_certificate, tmp_path / FILES.browser_key]
        store = Store([_load_certificate(tmp_path / FILES.ca_certificate)])
        PolicyBuilder().store(store).build_server_verifier(DNSName("localhost")).verify(
            _load_certificate(tmp_path / FILES.browser_certificate), []
        )

    def test_a_leaf_cannot_be_reissued_without_the_ca_key(self, tmp_path: Path) -> None:
        ensure_dev_certificates(tmp_path)
        (tmp_path / FILES.ca_key).unlink()
        (tmp_path / FILES.browser_certificate).unlink()
        (tmp_path / FILES.browser_key).unlink()

        with pytest.raises(DevCertificateError, match=re.escape(FILES.ca_key)):
            ensure_dev_certificates(tmp_path)
        assert not (tmp_path / FILES.browser_certificate).exists()

    def test_a_complete_set_of_real_certificates_needs_no_development_ca(
        self, tmp_path: Path
    ) -> None:
        ensure_dev_certificates(tmp_path)
        (tmp_path / FILES.ca_certificate).unlink()
        (tmp_path / FILES.ca_key).unlink()
        before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

        assert ensure_dev_certificates(tmp_path) == []
        assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before

    def test_the_command_line_lists_created_files_then_reports_nothing_missing(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        assert devcerts.main([str(tmp_path)]) == 0
        expected = [f"created {tmp_path / name}" for name in FILES.all_names()]
        assert sorted(capsys.readouterr().out.splitlines()) == sorted(expected)

        assert devcerts.main([str(tmp_path)]) == 0
        assert capsys.readouterr().out == f"nothing missing in {tmp_path}\n"


class TestPostgresTLS:
    def test_verify_full_with_the_development_ca_gets_an_encrypted_session(
        self, postgres_tls: PostgresServer
    ) -> None:
        rows = postgres_tls.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert rows == [(True,)]

    def test_users_inserted_by_a_test_can_be_read_back(self, postgres_tls: PostgresServer) -> None:
        user, token = str(uuid.uuid4()), str(uuid.uuid4())
        postgres_tls.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (user, token))
        rows = postgres_tls.execute("SELECT sse_token FROM users WHERE uuid = %s", (user,))
        assert rows == [(token,)]

    def test_a_client_trusting_another_ca_rejects_the_server(
        self, postgres_tls: PostgresServer, pki: Pki
    ) -> None:
        with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
            psycopg2.connect(postgres_tls.dsn, sslrootcert=str(pki.wrong_ca_certificate))

    def test_a_hostname_missing_from_the_certificate_is_rejected(
        self, postgres_tls: PostgresServer
    ) -> None:
        # hostaddr routes to the server while libpq checks the certificate against host.
        with pytest.raises(psycopg2.OperationalError, match="does not match host name"):
            psycopg2.connect(
                postgres_tls.dsn, host="not-in-certificate.invalid", hostaddr="127.0.0.1"
            )

    def test_plaintext_tcp_is_refused(self, postgres_tls: PostgresServer) -> None:
        with pytest.raises(psycopg2.OperationalError, match="no encryption"):
            psycopg2.connect(postgres_tls.dsn, sslmode="disable")

    def test_the_server_can_be_stopped_and_started_again(
        self, postgres_tls: PostgresServer
    ) -> None:
        postgres_tls.stop()
        with pytest.raises(psycopg2.OperationalError, match="Connection refused"):
            psycopg2.connect(postgres_tls.dsn)
        postgres_tls.start()
        assert postgres_tls.execute("SELECT 1") == [(1,)]


def _amqps_parameters(
    broker: RabbitMQServer, trusted_ca: Path, client_identity: tuple[Path, Path] | None
) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        host=broker.host,
        port=broker.amqps_port,
        credentials=pika.PlainCredentials(broker.username, broker.password),
        ssl_options=pika.SSLOptions(client_ssl_context(trusted_ca, client_identity), broker.host),
    )


def _read_after_handshake(broker: RabbitMQServer, context: ssl.SSLContext) -> None:
    """Handshake with the amqps listener, then wait for the broker's first bytes.

    Under TLS 1.3 the broker judges the client certificate after the client's handshake has
    finished, and answers with an alert. Reading without writing first is what makes that
    alert arrive reliably: had the client sent data the broker never read, its close would
    reset the connection and the alert could be lost (pika sees "EOF" then, now and again).
    """
    with (
        socket.create_connection(("127.0.0.1", broker.amqps_port), timeout=10) as connection,
        context.wrap_socket(connection, server_hostname=broker.host) as tls,
    ):
        tls.recv(1)


class TestRabbitMQTLS:
    def test_the_client_certificate_opens_an_amqps_connection(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki
    ) -> None:
        parameters = _amqps_parameters(
            rabbitmq_tls, pki.ca_certificate, (pki.client_certificate, pki.client_key)
        )
        connection = pika.BlockingConnection(parameters)
        try:
            declared = connection.channel().queue_declare("", exclusive=True)
            assert declared.method.queue.startswith("amq.gen-")
        finally:
            connection.close()

    def test_a_client_without_certificate_is_refused(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki
    ) -> None:
        context = client_ssl_context(pki.ca_certificate, None)
        with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
            _read_after_handshake(rabbitmq_tls, context)

    def test_a_client_certificate_from_another_ca_is_refused(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki, tmp_path: Path
    ) -> None:
        certificate, key = issue_certificate(
            create_certificate_authority("Stranger"), ["localhost"], client=True
        )
        write_certificate(tmp_path / "stranger.pem", certificate)
        write_private_key(tmp_path / "stranger_key.pem", key)
        context = client_ssl_context(
            pki.ca_certificate, (tmp_path / "stranger.pem", tmp_path / "stranger_key.pem")
        )
        with pytest.raises(ssl.SSLError, match="UNKNOWN_CA"):
            _read_after_handshake(rabbitmq_tls, context)

    def test_a_client_trusting_another_ca_rejects_the_broker(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki
    ) -> None:
        parameters = _amqps_parameters(
            rabbitmq_tls, pki.wrong_ca_certificate, (pki.client_certificate, pki.client_key)
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            pika.BlockingConnection(parameters)

    def test_a_stream_queue_replays_messages_from_the_first_offset(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki
    ) -> None:
        parameters = _amqps_parameters(
            rabbitmq_tls, pki.ca_certificate, (pki.client_certificate, pki.client_key)
        )
        stream = f"replay-{uuid.uuid4()}"
        connection = pika.BlockingConnection(parameters)
        try:
            channel = connection.channel()
            channel.queue_declare(stream, durable=True, arguments={"x-queue-type": "stream"})
            channel.confirm_delivery()  # publishes return once the stream has them
            for body in (b"one", b"two", b"three"):
                channel.basic_publish("", stream, body)
            channel.basic_qos(prefetch_count=10)  # streams refuse consumers without a prefetch
            received: list[bytes] = []
            for method, _, body in channel.consume(
                stream, arguments={"x-stream-offset": "first"}, inactivity_timeout=10
            ):
                assert method is not None, f"stream delivered only {received}"
                channel.basic_ack(method.delivery_tag)
                received.append(body)
                if len(received) == 3:
                    break
            channel.cancel()
            assert received == [b"one", b"two", b"three"]
        finally:
            connection.close()

    def test_stop_app_closes_the_listeners_until_start_app(
        self, rabbitmq_tls: RabbitMQServer, pki: Pki
    ) -> None:
        parameters = _amqps_parameters(
            rabbitmq_tls, pki.ca_certificate, (pki.client_certificate, pki.client_key)
        )
        rabbitmq_tls.stop_app()
        try:
            with pytest.raises(pika.exceptions.AMQPConnectionError):
                pika.BlockingConnection(parameters)
        finally:
            rabbitmq_tls.start_app()
        pika.BlockingConnection(parameters).close()
