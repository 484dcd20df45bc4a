"""``twistd -n sse-server`` as operators run it: installed, started, stopped, refused."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

import pika
import pytest
import pytest_twisted

from sse_twisted.devcerts import create_certificate_authority, issue_certificate, write_private_key
from tests.backends import Pki
from tests.browser import Browser
from tests.publishing import delete_queue, found_contract, publish
from tests.secrets_tracking import new_uuid
from tests.subscribers import add_local_subscriber
from tests.twistd_processes import TWISTD, spawn_twistd
from tests.waiting import bounded

REPOSITORY = Path(__file__).parent.parent


def run_twistd(
    arguments: list[str], environ: Mapping[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TWISTD), "-n", "--pidfile=", "sse-server", *arguments],
        env={"PATH": os.environ["PATH"], **environ},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "install",
    [["."], ["-e", ".", "--config-settings", "editable_mode=compat"]],
    ids=["pip-install", "pip-install-editable-compat"],
)
def test_twistd_lists_the_plugin_after_installing_the_distribution(
    tmp_path: Path, install: list[str]
) -> None:
    environment = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(environment)], check=True)
    # The dependencies come from the test venv as a plain path entry: its .pth files (and so
    # its own editable install of this project) are not processed, so only the new install
    # can make the plugin visible.
    site_packages = Path(
        sysconfig.get_paths(vars={"base": str(environment), "platbase": str(environment)})[
            "purelib"
        ]
    )
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = environment / "bin" / "python"
    listing = [str(python), "-c", "from twisted.scripts.twistd import run; run()", "--help"]
    before = subprocess.run(listing, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "sse-server" not in before.stdout
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", *install],
        cwd=REPOSITORY,
        check=True,
        capture_output=True,
    )
    after = subprocess.run(listing, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "sse-server" in after.stdout


def test_a_wrong_setting_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_twistd(["--certs-dir", str(tmp_path), "--port", "abc"], {}, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "sse-server: --port: 'abc' is not a port number"


def test_an_unknown_environment_value_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_twistd([], {"SSE_APP_ENV": "staging", "SSE_CERTS_DIR": str(tmp_path)}, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "sse-server: SSE_APP_ENV: 'staging' is not one of dev, prod"


def test_an_infinite_timeout_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_twistd(
        [], {"SSE_POSTGRES_TIMEOUT_SECONDS": "inf", "SSE_CERTS_DIR": str(tmp_path)}, tmp_path
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "sse-server: SSE_POSTGRES_TIMEOUT_SECONDS: 'inf' must be a finite number greater than 0"
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_a_missing_certs_dir_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = run_twistd(["--certs-dir", str(tmp_path / "nowhere")], {}, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().startswith("sse-server: --certs-dir: ")
    assert "is not a directory" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_key_that_does_not_match_its_certificate_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    for source in pki.directory.iterdir():
        (certs / source.name).write_bytes(source.read_bytes())
    (certs / "key.pem").unlink()
    _, other_key = issue_certificate(create_certificate_authority("Other"), ["localhost"])
    write_private_key(certs / "key.pem", other_key)
    result = run_twistd(["--certs-dir", str(certs)], {}, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == "sse-server: SSE_CERTS_DIR: key.pem does not match cert.pem"


@pytest_twisted.ensureDeferred
async def test_twistd_serves_a_stream_with_the_local_plaintext_backends_and_stops_on_sigterm(
    tmp_path: Path,
    plaintext_environ: dict[str, str],
    local_database: dict[str, str],
    browser: Browser,
) -> None:
    userid, token = add_local_subscriber(local_database["SSE_POSTGRES_DB_NAME"])
    process, _transport = spawn_twistd(plaintext_environ, tmp_path)
    try:
        port = await bounded(process.port, 30)
        # A stream starts at the tail the consumer finds when it attaches: what is
        # published before that is read back, not live (README, "Where live events start").
        await bounded(process.consuming, 30)
        url = f"https://localhost:{port}/subscribe/{new_uuid()}/{userid}/{token}"
        response, tab = await browser.open(url)
        assert response.code == 200
        queue = plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"]
        await publish(5672, queue, found_contract(userid))
        event = await tab.next_event()
        assert json.loads(event["data"]) == found_contract(userid)
    finally:
        exit_code, exit_signal = await process.terminate()
    # twistd stops the reactor cleanly, then re-raises SIGTERM so its parent sees it.
    assert (exit_code, exit_signal) == (None, signal.SIGTERM)
    assert "Main loop terminated." in [line["message"] for line in process.lines]
    await bounded(tab.closed)
    assert "connected" in tab.parser.comments
    messages = [line["message"] for line in process.lines]
    assert any("RabbitMQ link is plaintext" in message for message in messages)
    assert any("PostgreSQL link is not verify-full" in message for message in messages)
    assert all(line["env"] == "dev" and line["index"] == "sse" for line in process.lines)
    assert token.encode() not in process.raw
    log_file = (tmp_path / "logs" / "sse.log").read_bytes()
    assert log_file.count(b"\n") == len(process.lines)
    assert token.encode() not in log_file
    delete_queue(5672, queue)


@pytest_twisted.ensureDeferred
async def test_a_queue_that_exists_as_a_classic_queue_stops_start_up(
    tmp_path: Path, plaintext_environ: dict[str, str]
) -> None:
    queue = plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"]
    connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
    connection.channel().queue_declare(queue, durable=True)
    connection.close()
    try:
        process, _transport = spawn_twistd(plaintext_environ, tmp_path)
        exit_code, _ = await bounded(process.ended, 60)
    finally:
        delete_queue(5672, queue)
    assert exit_code == 1
    critical = [line for line in process.lines if line["@level"] == "critical"]
    assert len(critical) == 1
    assert queue in critical[0]["message"]
    assert "stream" in critical[0]["message"]


def test_help_says_password_options_show_in_ps_and_offers_files_instead(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(TWISTD), "sse-server", "--help"], capture_output=True, text=True, check=True
    )
    # One option per entry: an entry starts with its option name, wrapped lines follow.
    entries = re.split(r"\n {6}(?=--)", result.stdout)
    for name in ("postgres", "rabbitmq"):
        [password] = [entry for entry in entries if entry.startswith(f"--{name}-password=")]
        assert "visible in `ps`: prefer" in " ".join(password.split())
        assert "_PASSWORD_FILE" in password
        [password_file] = [
            entry for entry in entries if entry.startswith(f"--{name}-password-file=")
        ]
        assert f"SSE_{name.upper()}_PASSWORD_FILE" in password_file


def test_prod_with_plaintext_backends_refuses_to_start_in_one_line(
    tmp_path: Path, pki: Pki
) -> None:
    environ = {
        "SSE_APP_ENV": "prod",
        "SSE_CERTS_DIR": str(pki.directory),
        "SSE_RABBITMQ_TLS": "false",
        "SSE_POSTGRES_SSLMODE": "require",
    }
    result = run_twistd([], environ, tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "sse-server: refused in prod: SSE_RABBITMQ_TLS=false (plaintext RabbitMQ), "
        "SSE_POSTGRES_SSLMODE=require (below verify-ca: the PostgreSQL server is not "
        "verified); use TLS, or set SSE_ALLOW_INSECURE_BACKENDS=true to start anyway"
    )
    assert "Traceback" not in result.stderr + result.stdout
    # Each link alone is refused too, and verify-ca is enough.
    for insecure in (
        {"SSE_RABBITMQ_TLS": "false"},
        {"SSE_POSTGRES_SSLMODE": "prefer"},
    ):
        alone = run_twistd(
            [], {"SSE_APP_ENV": "prod", "SSE_CERTS_DIR": str(pki.directory), **insecure}, tmp_path
        )
        assert alone.returncode != 0
        [line] = alone.stderr.strip().splitlines()
        [(variable, value)] = insecure.items()
        assert f"{variable}={value}" in line
        assert "SSE_ALLOW_INSECURE_BACKENDS=true" in line


@pytest_twisted.ensureDeferred
async def test_prod_with_plaintext_backends_starts_with_the_opt_out_and_warns(
    tmp_path: Path, plaintext_environ: dict[str, str]
) -> None:
    environ = {**plaintext_environ, "SSE_APP_ENV": "prod", "SSE_ALLOW_INSECURE_BACKENDS": "true"}
    process, _transport = spawn_twistd(environ, tmp_path)
    try:
        await bounded(process.consuming, 30)
    finally:
        await process.terminate()
    warnings = [line["message"] for line in process.lines if line["@level"] == "warn"]
    assert any("RabbitMQ link is plaintext" in message for message in warnings)
    assert any("PostgreSQL link is not verify-full" in message for message in warnings)
    assert all(line["env"] == "prod" for line in process.lines)
    delete_queue(5672, environ["SSE_RABBITMQ_QUEUE_NAME"])


@pytest_twisted.ensureDeferred
async def test_a_port_in_use_ends_twistd_with_that_cause_and_no_other_complaint(
    tmp_path: Path, plaintext_environ: dict[str, str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process, _transport = spawn_twistd({**plaintext_environ, "SSE_PORT": str(port)}, tmp_path)
        exit_code, _signal = await bounded(process.ended, 30)
    assert exit_code == 1
    started = next(n for n, line in enumerate(process.lines) if "starting up" in line["message"])
    complaints = [
        line["message"]
        for line in process.lines[started:]
        if line["@level"] in ("warn", "error", "critical")
    ]
    assert complaints and all(
        "Address already in use" in m or m == "cannot listen" for m in complaints
    ), complaints
    assert (
        f"cannot listen: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use."
        in complaints
    )
