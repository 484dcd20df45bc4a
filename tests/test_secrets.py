"""Secrets never reach a log line: a real twistd process driven through every path with a
known token and known backend passwords, its whole output and log file searched for them.

(The whole suite is checked too: tests/conftest.py fails the run if any token or password
made by ``new_token``/``new_password`` is in any line logged during the session.)
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg2
import pytest
import pytest_twisted

from tests.backends import PostgresServer, RabbitMQServer
from tests.browser import Browser
from tests.publishing import found_contract, publish
from tests.secrets_tracking import leaked_secrets, new_password, new_token, new_uuid
from tests.subscribers import add_subscriber
from tests.twistd_processes import spawn_twistd
from tests.waiting import bounded, wait_for


def test_the_session_audit_finds_a_secret_in_any_case_and_names_its_line() -> None:
    token = new_uuid()
    lines = ['{"message": "fine"}', f'{{"message": "oops {token.upper()}"}}']
    assert leaked_secrets(lines, {token, "absent"}) == {token: lines[1]}
    assert leaked_secrets(lines, {"absent"}) == {}


@pytest_twisted.ensureDeferred
async def test_no_token_or_password_in_any_line_of_a_server_driven_through_every_path(
    tmp_path: Path,
    tls_environ: dict[str, str],
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    browser: Browser,
) -> None:
    postgres_password, rabbitmq_password = new_password(), new_password()
    rabbitmq_user = f"sse-{new_uuid()}"
    rabbitmq_tls.rabbitmqctl("add_user", rabbitmq_user, rabbitmq_password)
    rabbitmq_tls.rabbitmqctl("set_permissions", "-p", "/", rabbitmq_user, ".*", ".*", ".*")
    queue = tls_environ["SSE_RABBITMQ_QUEUE_NAME"]
    userid, token = add_subscriber(postgres_tls)
    process, _transport = spawn_twistd(
        {
            **tls_environ,
            "SSE_APP_ENV": "dev",
            "SSE_LOGS_DIR": str(tmp_path / "logs"),
            "SSE_POSTGRES_PASSWORD": postgres_password,
            "SSE_POSTGRES_TIMEOUT_SECONDS": "1",
            "SSE_AUTH_CACHE_SECONDS": "0",
            "SSE_RABBITMQ_USERNAME": rabbitmq_user,
            "SSE_RABBITMQ_PASSWORD": rabbitmq_password,
            "SSE_HEARTBEAT_SECONDS": "1",
        },
        tmp_path,
    )
    try:
        port = await bounded(process.port, 30)
        await bounded(process.consuming, 30)
        base = f"https://localhost:{port}/subscribe/{new_uuid()}"

        # 200, and an event delivered on it.
        _, tab = await browser.open(f"{base}/{userid}/{token}")
        await publish(rabbitmq_tls.amqp_port, queue, found_contract(userid))
        assert json.loads((await tab.next_event())["data"])["userid"] == userid
        # 403: the token with another user, another token with this user.
        for path in (f"{new_uuid()}/{token}", f"{userid}/{new_token()}"):
            refused = await browser.get(f"{base}/{path}")
            assert refused.code == 403
            await browser.read_body(refused)
        # 400 with the token as the bad part, and query strings carrying it.
        for path in (
            f"{userid}/{token.upper()}",
            f"{userid}/{token}x",
            f"{userid}/{token}/extra",
            f"{userid}/{token[:-1]}",
            f"{userid}?token={token}",
        ):
            bad = await browser.get(f"{base}/{path}")
            assert bad.code in (400, 404), path
            await browser.read_body(bad)
        # The client leaves an open stream.
        tab.close()
        await bounded(tab.closed)
        # Revocation closes an open stream.
        _, revoked = await browser.open(f"{base}/{userid}/{token}")
        await wait_for(lambda: "connected" in revoked.parser.comments, "the stream to open")
        postgres_tls.execute("DELETE FROM users WHERE uuid = %s", (userid,))
        await bounded(revoked.closed)
        # Backend unavailable: asked to retry, with the database down.
        postgres_tls.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (userid, token))
        postgres_tls.stop()
        try:
            response = await browser.get(f"{base}/{userid}/{token}")
            body = await browser.read_body(response)
            assert response.code == 200 and b"retry" in body
        finally:
            postgres_tls.start()
    finally:
        await process.terminate()

    output = [process.raw.decode(), process.stderr.decode()]
    log_file = (tmp_path / "logs" / "sse.log").read_text()
    statuses = {line.get("status") for line in map(json.loads, log_file.splitlines())}
    assert {200, 400, 403} <= statuses, "every path was logged"
    assert "access revoked" in log_file and "unavailable" in log_file
    secrets = {token, postgres_password, rabbitmq_password}
    assert leaked_secrets([*output, log_file], secrets) == {}


@pytest_twisted.ensureDeferred
async def test_twistd_in_prod_logs_in_to_postgresql_with_the_password_from_its_file(
    tmp_path: Path, postgres_tls: PostgresServer, tls_environ: dict[str, str], browser: Browser
) -> None:
    """The test PostgreSQL trusts its other users; this role must give its password, so a
    subscriber is let in only if the server read it from SSE_POSTGRES_PASSWORD_FILE."""
    role, password = f"sse_password_{new_uuid()[:8]}", new_password()
    postgres_tls.execute(f'CREATE ROLE "{role}" LOGIN PASSWORD %s', (password,))
    postgres_tls.execute(f'GRANT SELECT ON users TO "{role}"')
    hba = postgres_tls.data_directory / "pg_hba.conf"
    trusting = hba.read_text()
    hba.write_text(f"hostssl all {role} 127.0.0.1/32 scram-sha-256\n{trusting}")
    postgres_tls.execute("SELECT pg_reload_conf()")
    secret = tmp_path / "postgres_password"
    secret.write_text(f"{password}\n")
    try:
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(postgres_tls.dsn, user=role, password=new_password()).close()
        userid, token = add_subscriber(postgres_tls)
        process, _transport = spawn_twistd(
            {
                **tls_environ,
                "SSE_APP_ENV": "prod",
                "SSE_PORT": "0",
                "SSE_LISTEN_ADDRESS": "127.0.0.1",
                "SSE_POSTGRES_USERNAME": role,
                "SSE_POSTGRES_PASSWORD_FILE": str(secret),
                "SSE_AUTH_CACHE_SECONDS": "0",
            },
            tmp_path,
        )
        try:
            port = await bounded(process.port, 30)
            await wait_for(
                lambda: any(
                    line["message"].startswith("connected to PostgreSQL") for line in process.lines
                ),
                "the server to log in to PostgreSQL",
                30,
            )
            response, tab = await browser.open(
                f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}"
            )
            assert response.code == 200
            await wait_for(lambda: "connected" in tab.parser.comments, "the stream to open")
        finally:
            await process.terminate()
    finally:
        hba.write_text(trusting)
        postgres_tls.execute("SELECT pg_reload_conf()")
        postgres_tls.execute(f'DROP OWNED BY "{role}"')
        postgres_tls.execute(f'DROP ROLE "{role}"')
    assert leaked_secrets([process.raw.decode(), process.stderr.decode()], {password}) == {}
