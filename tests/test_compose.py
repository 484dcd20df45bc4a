"""The container files agree with the code: no Docker engine runs here, so they are read.

docker-compose.yml, the Dockerfile and deploy/ are checked against the settings table, the
certificate names the server loads and the Makefile; the scripts under deploy/ and the
image's HEALTHCHECK command are run for real against local stand-ins.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
import yaml
from twisted.internet.threads import deferToThread

from sse_twisted import _tls
from sse_twisted._config import SETTINGS
from sse_twisted.devcerts import DEV_CERTIFICATE_FILES
from tests.backends import Pki, PostgresServer, RabbitMQServer, free_port
from tests.harness import new_uuid, start_server

REPOSITORY = Path(__file__).parent.parent
COMPOSE_FILE = REPOSITORY / "docker-compose.yml"
DOCKERFILE = REPOSITORY / "Dockerfile"
SETTINGS_BY_ENV = {setting.env: setting for setting in SETTINGS}
# Every file the server reads from SSE_CERTS_DIR.
SERVER_FILES = {
    _tls.SERVER_CERT_FILE,
    _tls.SERVER_KEY_FILE,
    _tls.SERVER_CA_FILE,
    _tls.RABBITMQ_CLIENT_CERT_FILE,
    _tls.RABBITMQ_CLIENT_KEY_FILE,
    _tls.RABBITMQ_CA_FILE,
    _tls.POSTGRES_CA_FILE,
}
_DEFAULTED = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):-([^}]*)\}")


def interpolate(value: str) -> str:
    """A value as docker compose would see it with none of the variables set."""
    assert "$" not in _DEFAULTED.sub("", value), f"{value!r}: a variable without default"
    return _DEFAULTED.sub(lambda match: match.group(2), value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in service["environment"].items()}


def installed_certificates(service: dict[str, Any]) -> tuple[str, str, list[str], list[str]]:
    """(owner, directory, files, command) of a service whose entrypoint is install-certs.sh."""
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["sh", "/deploy/install-certs.sh"]
    owner, directory, *rest = entrypoint[2:]
    files, command = (
        (rest[: rest.index("--")], rest[rest.index("--") + 1 :]) if "--" in rest else (rest, [])
    )
    return owner, directory, files, command


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source of each volume."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def test_every_sse_variable_of_the_stack_is_a_setting_and_parses(
    services: dict[str, Any],
) -> None:
    seen = 0
    for name, service in services.items():
        for variable, value in service.get("environment", {}).items():
            if not variable.startswith("SSE_"):
                continue
            seen += 1
            assert variable in SETTINGS_BY_ENV, f"{name}: {variable} is no setting"
            if variable in ("SSE_CERTS_DIR", "SSE_LOGS_DIR"):
                # A path inside the container: it must be a volume there.
                assert interpolate(str(value)) in mounts(service), f"{variable} is not mounted"
                continue
            SETTINGS_BY_ENV[variable].parse(interpolate(str(value)))
    assert seen >= 10


def test_the_server_gets_every_certificate_file_it_loads_and_only_known_names(
    services: dict[str, Any],
) -> None:
    owner, directory, files, command = installed_certificates(services["sse-certs"])
    assert (owner, command) == ("sse", [])
    assert set(files) == SERVER_FILES
    sse = services["sse"]
    assert environment(sse)["SSE_CERTS_DIR"] == directory
    # The volume the one-shot fills is the one the server reads, and it waits for it.
    assert mounts(services["sse-certs"])[directory] == mounts(sse)[directory]
    assert mounts(sse)[directory] == "sse-tls"
    assert sse["depends_on"]["sse-certs"] == {"condition": "service_completed_successfully"}
    for service in services.values():
        if "/deploy/install-certs.sh" in service.get("entrypoint", []):
            assert set(installed_certificates(service)[2]) <= set(DEV_CERTIFICATE_FILES.all_names())
            assert mounts(service)["/certs"] == "./certs"


def rabbitmq_settings() -> dict[str, str]:
    lines = (REPOSITORY / "deploy/rabbitmq/20-sse-tls.conf").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def test_rabbitmq_accepts_only_tls_clients_with_a_certificate(services: dict[str, Any]) -> None:
    rabbitmq = services["rabbitmq"]
    assert rabbitmq["image"].endswith("-management")
    conf = rabbitmq_settings()
    assert mounts(rabbitmq)["/etc/rabbitmq/conf.d/20-sse-tls.conf"] == (
        "./deploy/rabbitmq/20-sse-tls.conf"
    )
    assert conf["ssl_options.verify"] == "verify_peer"
    assert conf["ssl_options.fail_if_no_peer_cert"] == "true"
    assert conf["listeners.tcp"] == "none"
    assert conf["listeners.ssl.default"] == environment(services["sse"])["SSE_RABBITMQ_PORT"]
    assert conf["management.tcp.port"] == "15672"
    files = DEV_CERTIFICATE_FILES
    owner, directory, installed, command = installed_certificates(rabbitmq)
    assert (owner, command) == ("rabbitmq", ["docker-entrypoint.sh"])
    assert {
        conf["ssl_options.cacertfile"],
        conf["ssl_options.certfile"],
        conf["ssl_options.keyfile"],
    } == {f"{directory}/{name}" for name in installed}
    assert conf["ssl_options.certfile"] == f"{directory}/{files.rabbitmq_server_certificate}"
    assert conf["ssl_options.keyfile"] == f"{directory}/{files.rabbitmq_server_key}"
    assert conf["ssl_options.cacertfile"] == f"{directory}/{files.rabbitmq_ca}"
    # The server's RabbitMQ login is the one the broker creates.
    sse = environment(services["sse"])
    broker = environment(rabbitmq)
    assert sse["SSE_RABBITMQ_USERNAME"] == broker["RABBITMQ_DEFAULT_USER"]
    assert sse["SSE_RABBITMQ_PASSWORD"] == broker["RABBITMQ_DEFAULT_PASS"]
    assert sse["SSE_RABBITMQ_TLS"] == "true"


def postgres_options(service: dict[str, Any]) -> dict[str, str]:
    command = service["command"]
    assert command[0] == "postgres"
    options = command[2::2]
    assert command[1::2] == ["-c"] * len(options)
    return dict(option.split("=", 1) for option in options)


def makefile_variable(name: str) -> str:
    [value] = re.findall(rf"^{name} \?= (\S+)$", (REPOSITORY / "Makefile").read_text(), re.M)
    return value


def test_postgres_serves_tls_only_with_its_own_key_and_the_demo_user(
    services: dict[str, Any],
) -> None:
    postgres = services["postgres"]
    options = postgres_options(postgres)
    owner, directory, installed, command = installed_certificates(postgres)
    files = DEV_CERTIFICATE_FILES
    assert (owner, command) == ("postgres", ["docker-entrypoint.sh"])
    assert set(installed) == {files.postgres_server_certificate, files.postgres_server_key}
    assert options["ssl"] == "on"
    assert options["ssl_cert_file"] == f"{directory}/{files.postgres_server_certificate}"
    assert options["ssl_key_file"] == f"{directory}/{files.postgres_server_key}"
    hba_lines = [
        line.split()
        for line in (REPOSITORY / "deploy/postgres/pg_hba.conf").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert options["hba_file"] == "/deploy/postgres/pg_hba.conf"
    assert {line[0] for line in hba_lines} == {"local", "hostssl", "host"}
    assert all(line[-1] == "reject" for line in hba_lines if line[0] == "host")
    volumes = mounts(postgres)
    assert volumes["/docker-entrypoint-initdb.d"] == "./deploy/postgres-init"
    assert volumes["/schema"] == "./schema"
    database = environment(postgres)
    sse = environment(services["sse"])
    assert database["DEMO_USERID"] == makefile_variable("DEMO_USERID")
    assert database["DEMO_TOKEN"] == makefile_variable("DEMO_TOKEN")
    assert sse["SSE_POSTGRES_USERNAME"] == database["APP_DB_USER"]
    assert sse["SSE_POSTGRES_PASSWORD"] == database["APP_DB_PASSWORD"]
    assert sse["SSE_POSTGRES_DB_NAME"] == database["POSTGRES_DB"]
    assert sse["SSE_POSTGRES_SSLMODE"] == "verify-full"


def test_the_backends_are_health_gated_and_named_as_in_their_certificates(
    services: dict[str, Any],
) -> None:
    sse = services["sse"]
    for backend in ("rabbitmq", "postgres"):
        assert sse["depends_on"][backend] == {"condition": "service_healthy"}
        assert services[backend]["healthcheck"]["test"][0] == "CMD"
    settings = environment(sse)
    # verify-full and the AMQP hostname check match these names against the certificates.
    assert settings["SSE_RABBITMQ_HOST"] == "rabbitmq"
    assert settings["SSE_POSTGRES_HOST"] == "postgres"
    from sse_twisted.devcerts import DEFAULT_HOSTNAMES

    assert {"rabbitmq", "postgres", "sse"} <= set(DEFAULT_HOSTNAMES)


def published(service: dict[str, Any]) -> dict[int, str]:
    """Container port -> host address it is published on ("" = every address)."""
    ports = {}
    for mapping in service["ports"]:
        *host, _host_port, container_port = ["", *mapping.split(":")][-3:]
        ports[int(container_port)] = host[0] if host else ""
    return ports


def test_published_ports_are_the_configured_ones_and_metrics_stay_on_loopback(
    services: dict[str, Any],
) -> None:
    sse = services["sse"]
    settings = environment(sse)
    ports = published(sse)
    assert set(ports) == {int(settings["SSE_PORT"]), int(settings["SSE_METRICS_PORT"])}
    assert ports[int(settings["SSE_METRICS_PORT"])] == "127.0.0.1"
    # Inside its container the listener must take connections from the published port.
    assert settings["SSE_METRICS_ADDRESS"] == "0.0.0.0"
    assert all(address == "127.0.0.1" for address in published(services["rabbitmq"]).values())
    assert "ports" not in services["postgres"]
    exposed = re.findall(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M)
    assert exposed == [f"{settings['SSE_PORT']} {settings['SSE_METRICS_PORT']}"]


def dockerfile_instruction(name: str) -> list[str]:
    """The arguments of each ``name`` instruction, continuation lines joined."""
    # Docker drops comment lines, also inside a continued instruction.
    lines = DOCKERFILE.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    text = text.replace("\\\n", " ")
    return [
        line.split(None, 1)[1].strip()
        for line in text.splitlines()
        if line.split(None, 1)[:1] == [name]
    ]


def healthcheck_command() -> list[str]:
    [healthcheck] = dockerfile_instruction("HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return command


def test_the_image_runs_twistd_as_a_user_with_a_fresh_plugin_cache() -> None:
    assert dockerfile_instruction("ENTRYPOINT") == ['["twistd", "-n", "--pidfile=", "sse-server"]']
    bases = dockerfile_instruction("FROM")
    assert all(base.startswith("python:3.11-slim") for base in bases)
    assert dockerfile_instruction("USER") == ["sse"]
    [install] = [run for run in dockerfile_instruction("RUN") if "pip install" in run]
    assert "list(getPlugins(IPlugin))" in install
    assert install.index("pip install") < install.index("getPlugins")
    [environment_line] = dockerfile_instruction("ENV")
    for variable in re.findall(r"(SSE_[A-Z_]+)=", environment_line):
        assert variable in SETTINGS_BY_ENV
    ignored = (REPOSITORY / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :].count("!certs") == 0, "keys would reach the image"
    assert "*" in ignored


def test_the_healthcheck_probes_healthz_with_python_alone() -> None:
    command = healthcheck_command()
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    assert "SSE_PORT" in command[2]


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    command = healthcheck_command()
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={"SSE_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest_twisted.ensureDeferred
async def test_the_image_healthcheck_passes_against_a_running_server_and_fails_without(
    pki: Pki, postgres_tls: PostgresServer, rabbitmq_tls: RabbitMQServer
) -> None:
    server = await start_server(
        {
            "SSE_CERTS_DIR": str(pki.directory),
            "SSE_POSTGRES_HOST": postgres_tls.host,
            "SSE_POSTGRES_PORT": str(postgres_tls.port),
            "SSE_POSTGRES_DB_NAME": postgres_tls.database,
            "SSE_RABBITMQ_HOST": rabbitmq_tls.host,
            "SSE_RABBITMQ_PORT": str(rabbitmq_tls.amqps_port),
            "SSE_RABBITMQ_QUEUE_NAME": f"messages-{new_uuid()}",
        }
    )
    try:
        port = server.port
        healthy = await deferToThread(run_healthcheck, port)
    finally:
        await server.stop()
    assert healthy.returncode == 0, healthy.stderr
    unhealthy = await deferToThread(run_healthcheck, free_port())
    assert unhealthy.returncode != 0


@pytest.mark.skipif(os.geteuid() != 0, reason="install-certs.sh runs as the container's root")
def test_install_certs_gives_the_service_user_its_own_copies(pki: Pki, tmp_path: Path) -> None:
    account = pwd.getpwnam("postgres")
    target = tmp_path / "tls"
    result = subprocess.run(
        [
            "sh",
            str(REPOSITORY / "deploy/install-certs.sh"),
            "postgres",
            str(target),
            "postgres_server.crt",
            "postgres_server.key",
            "--",
            "sh",
            "-c",
            "echo started as $0",
            "the-command",
        ],
        env={"PATH": os.environ["PATH"], "CERTS_SOURCE": str(pki.directory)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[-1] == "started as the-command"
    modes = {path.name: path.stat().st_mode & 0o777 for path in target.iterdir()}
    assert modes == {"postgres_server.crt": 0o644, "postgres_server.key": 0o600}
    assert {path.stat().st_uid for path in [target, *target.iterdir()]} == {account.pw_uid}
    assert target.stat().st_mode & 0o777 == 0o700


def test_install_certs_stops_when_a_file_is_missing(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            "sh",
            str(REPOSITORY / "deploy/install-certs.sh"),
            pwd.getpwuid(os.geteuid()).pw_name,
            str(tmp_path / "tls"),
            "cert.pem",
            "--",
            "true",
        ],
        env={"PATH": os.environ["PATH"], "CERTS_SOURCE": str(tmp_path / "empty")},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "run 'make certs' first" in result.stderr


@pytest.fixture
def scratch_database() -> Iterator[str]:
    """A new database on the machine's PostgreSQL, dropped afterwards."""
    name = f"sse_compose_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


def run_sql(database: str, *statements: str, role: str | None = None) -> list[Any]:
    """Run ``statements`` in ``database`` on the machine's PostgreSQL, as ``role`` if given;
    return the rows of the last one."""
    with closing(psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database)) as c:
        c.autocommit = True
        with c.cursor() as cursor:
            if role is not None:
                cursor.execute(f'SET ROLE "{role}"')
            for statement in statements:
                cursor.execute(statement)
            return cursor.fetchall() if cursor.description else []


def test_the_postgres_init_script_creates_the_schema_a_read_only_role_and_the_demo_user(
    services: dict[str, Any], scratch_database: str
) -> None:
    settings = environment(services["postgres"])
    role = f"sse_role_{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["sh", str(REPOSITORY / "deploy/postgres-init/10-sse.sh")],
        env={
            "PATH": os.environ["PATH"],
            # The container's libpq talks to its socket; here, to the machine's server.
            "PGHOST": "127.0.0.1",
            "SCHEMA_DIR": str(REPOSITORY / "schema"),
            "POSTGRES_USER": "postgres",
            "POSTGRES_DB": scratch_database,
            "APP_DB_USER": role,
            "APP_DB_PASSWORD": "secret",
            "DEMO_USERID": settings["DEMO_USERID"],
            "DEMO_TOKEN": settings["DEMO_TOKEN"],
        },
        check=True,
        capture_output=True,
    )
    try:
        rows = run_sql(scratch_database, "SELECT uuid, sse_token FROM users", role=role)
        assert rows == [(settings["DEMO_USERID"], settings["DEMO_TOKEN"])]
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            run_sql(scratch_database, "INSERT INTO users VALUES ('a', 'b')", role=role)
        triggers = run_sql(
            scratch_database,
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass"
            " AND NOT tgisinternal ORDER BY tgname",
        )
        assert triggers == [("users_sse_revocation",), ("users_sse_truncation",)]
    finally:
        run_sql(scratch_database, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def test_make_adduser_inserts_a_random_user_and_prints_its_url(scratch_database: str) -> None:
    run_sql(scratch_database, (REPOSITORY / "schema/users.sql").read_text())
    result = subprocess.run(
        ["make", "--no-print-directory", "adduser", f"PGDATABASE={scratch_database}"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    )
    url = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"https://localhost:8001/subscribe/([0-9a-f-]{36})/([0-9a-f-]{36})/([0-9a-f-]{36})", url
    )
    assert match, url
    rows = run_sql(scratch_database, "SELECT uuid, sse_token FROM users")
    assert rows == [(match.group(2), match.group(3))]
    assert all(uuid.UUID(part).version == 4 for part in match.groups())


def test_make_help_lists_every_target_on_one_line() -> None:
    makefile = (REPOSITORY / "Makefile").read_text()
    targets = set(re.findall(r"^\.PHONY: (\S+)$", makefile, re.M))
    assert {"certs", "run", "test", "lint", "up", "down", "logs", "publish", "adduser"} <= targets
    lines = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    listed = [line.split()[1] for line in lines]
    assert sorted(listed) == sorted(targets)


def docker_compose_available() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not docker_compose_available(),
    reason="the docker compose plugin is not installed (the docker CLI here has no compose)",
)
def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_shell_scripts_parse() -> None:
    for script in [
        REPOSITORY / "deploy/install-certs.sh",
        REPOSITORY / "deploy/postgres-init/10-sse.sh",
    ]:
        subprocess.run(["sh", "-n", str(script)], check=True)
        assert os.access(script, os.X_OK), f"{script} is not executable"
