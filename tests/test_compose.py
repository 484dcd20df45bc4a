"""The container files agree with the code: no Docker engine runs here, so they are read.

docker-compose.yml, the Dockerfile and deploy/ are checked against the settings table, the
certificate names the server loads and the Makefile; the scripts under deploy/ and the
image's HEALTHCHECK command are run for real against local stand-ins.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg2
import pytest
import pytest_twisted
import yaml
from twisted.internet.threads import deferToThread

from sse_twisted import _tls
from sse_twisted._config import SETTINGS, load_config
from sse_twisted._partitions import partition_of
from sse_twisted.devcerts import DEV_CERTIFICATE_FILES
from tests.backends import Pki, PostgresServer, RabbitMQServer, free_port
from tests.browser import Browser
from tests.in_process_server import start_server
from tests.publishing import delete_super_stream, found_contract
from tests.secrets_tracking import new_password, new_uuid
from tests.subscribers import add_subscriber

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


def secret_file(service: dict[str, Any], path: str) -> str:
    """The name of the compose secret mounted at ``path`` in ``service`` (a compose secret
    without a target is mounted at /run/secrets/<name>)."""
    name = path.removeprefix("/run/secrets/")
    assert path == f"/run/secrets/{name}", f"{path} is not where compose mounts secrets"
    assert name in service.get("secrets", []), f"{name} is not given to this service"
    return name


def test_every_sse_variable_of_the_stack_is_a_setting_and_parses(
    services: dict[str, Any],
) -> None:
    seen = 0
    for name, service in services.items():
        for variable, value in service.get("environment", {}).items():
            if not variable.startswith("SSE_"):
                continue
            seen += 1
            if variable.endswith("_FILE"):
                setting = SETTINGS_BY_ENV[variable.removesuffix("_FILE")]
                assert setting.secret, f"{name}: {variable}: only secrets come from files"
                assert secret_file(service, str(value)), f"{name}: {variable} is no secret"
                continue
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
            installed = installed_certificates(service)[2]
            assert set(installed) <= set(DEV_CERTIFICATE_FILES.all_names())
            # Exactly the files it installs, one by one.
            certificate_mounts = {
                target: source
                for target, source in mounts(service).items()
                if source.startswith("./certs")
            }
            assert certificate_mounts == {f"/certs/{name}": f"./certs/{name}" for name in installed}


def test_no_container_gets_the_ca_key_the_certs_directory_or_the_deploy_directory(
    services: dict[str, Any],
) -> None:
    for name, service in services.items():
        sources = mounts(service).values()
        assert not any(DEV_CERTIFICATE_FILES.ca_key in source for source in sources), name
        assert "./certs" not in sources, f"{name} mounts every certificate and key"
        assert "./deploy" not in sources, f"{name} mounts all of deploy/"
        # Each file of deploy/ it mounts is one it uses: on its entrypoint or command line,
        # or where the image reads it.
        # or one that another mounted file names (the edge's shards.map).
        used = " ".join(map(str, [*service.get("entrypoint", []), *service.get("command", [])]))
        deploy_files = {
            target: source
            for target, source in mounts(service).items()
            if source.startswith("./deploy/")
        }
        for target, source in deploy_files.items():
            assert (REPOSITORY / source).exists(), source
            named_by_another = any(
                target in (REPOSITORY / other).read_text()
                for other in deploy_files.values()
                if other != source and (REPOSITORY / other).is_file()
            )
            assert (
                target in used
                or named_by_another
                or target.startswith(("/etc/rabbitmq/conf.d/", "/docker-entrypoint-initdb.d"))
            ), f"{name}: {source} is mounted but not used"


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
    assert (owner, command) == (
        "rabbitmq",
        [
            "sh",
            "/deploy/write-definitions.sh",
            conf["load_definitions"],
            "--",
            "docker-entrypoint.sh",
        ],
    )
    assert {
        conf["ssl_options.cacertfile"],
        conf["ssl_options.certfile"],
        conf["ssl_options.keyfile"],
    } == {f"{directory}/{name}" for name in installed}
    assert conf["ssl_options.certfile"] == f"{directory}/{files.rabbitmq_server_certificate}"
    assert conf["ssl_options.keyfile"] == f"{directory}/{files.rabbitmq_server_key}"
    assert conf["ssl_options.cacertfile"] == f"{directory}/{files.rabbitmq_ca}"
    assert mounts(rabbitmq)["/deploy/write-definitions.sh"] == (
        "./deploy/rabbitmq/write-definitions.sh"
    )
    sse = environment(services["sse"])
    assert sse["SSE_RABBITMQ_TLS"] == "true"


def test_the_server_logs_in_to_rabbitmq_as_its_own_account_not_the_administrator(
    services: dict[str, Any],
) -> None:
    sse, rabbitmq = services["sse"], services["rabbitmq"]
    settings, broker = environment(sse), environment(rabbitmq)
    # write-definitions.sh gives this account configure and read on this queue only
    # (test_the_stacks_rabbitmq_account_can_declare_and_consume_its_stream_and_nothing_else).
    assert settings["SSE_RABBITMQ_USERNAME"] == broker["RABBITMQ_SSE_USER"]
    assert settings["SSE_RABBITMQ_QUEUE_NAME"] == broker["RABBITMQ_SSE_QUEUE"]
    assert broker["RABBITMQ_SSE_USER"] != broker["RABBITMQ_ADMIN_USER"]
    assert secret_file(sse, settings["SSE_RABBITMQ_PASSWORD_FILE"]) == secret_file(
        rabbitmq, broker["RABBITMQ_SSE_PASSWORD_FILE"]
    )
    # The administrator's password is not the server's to read.
    admin_secret = secret_file(rabbitmq, broker["RABBITMQ_ADMIN_PASSWORD_FILE"])
    assert admin_secret not in sse["secrets"]
    # A node that loads definitions creates no default user: these are the only two.
    assert not any(name.startswith("RABBITMQ_DEFAULT_") for name in broker)


def postgres_options(service: dict[str, Any]) -> dict[str, str]:
    command = service["command"]
    assert command[0] == "postgres"
    options = command[2::2]
    assert command[1::2] == ["-c"] * len(options)
    return dict(option.split("=", 1) for option in options)


def makefile_variable(name: str) -> str:
    [value] = re.findall(rf"^{name} \?= (\S+)$", (REPOSITORY / "Makefile").read_text(), re.M)
    return value


def test_postgres_serves_tls_only_with_its_own_key_and_the_servers_role(
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
    # A well-known demo token has no place in a prod database.
    assert "DEMO_USERID" not in database and "DEMO_TOKEN" not in database
    assert sse["SSE_POSTGRES_USERNAME"] == database["APP_DB_USER"]
    assert secret_file(services["sse"], sse["SSE_POSTGRES_PASSWORD_FILE"]) == secret_file(
        postgres, database["APP_DB_PASSWORD_FILE"]
    )
    assert (
        secret_file(postgres, database["POSTGRES_PASSWORD_FILE"]) not in services["sse"]["secrets"]
    )
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


def test_only_the_browser_port_is_published_and_metrics_stay_inside_the_container(
    services: dict[str, Any],
) -> None:
    sse = services["sse"]
    settings = environment(sse)
    ports = published(sse)
    assert set(ports) == {int(settings["SSE_PORT"])}
    # Metrics listen on the container's loopback only (`make metrics` reads them there).
    assert settings["SSE_METRICS_ADDRESS"] == "127.0.0.1"
    assert (
        f"127.0.0.1:{settings['SSE_METRICS_PORT']}/metrics" in (REPOSITORY / "Makefile").read_text()
    )
    assert all(address == "127.0.0.1" for address in published(services["rabbitmq"]).values())
    assert "ports" not in services["postgres"]
    exposed = re.findall(r"^EXPOSE (.+)$", DOCKERFILE.read_text(), re.M)
    assert exposed == [settings["SSE_PORT"]]


HAPROXY = REPOSITORY / "deploy" / "haproxy"
SHARDED_EDGE = HAPROXY / "haproxy-sharded.cfg"


def shards_table() -> dict[int, str]:
    """deploy/haproxy/shards.map: partition -> the backend of its shard."""
    lines = (HAPROXY / "shards.map").read_text().splitlines()
    pairs = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    return {int(partition): backend for partition, backend in pairs}


def sharded_edge() -> tuple[int, dict[str, list[str]]]:
    """haproxy-sharded.cfg: its number of partitions (the ``mod``), and the addresses of
    each backend's servers."""
    text = SHARDED_EDGE.read_text()
    [modulus] = re.findall(r"crc32,mod\((\d+)\)", text)
    backends: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("backend "):
            servers = backends.setdefault(line.split()[1], [])
        elif line.strip().startswith("server "):
            servers.append(line.split()[2])
    return int(modulus), backends


def test_the_fleet_profile_runs_the_shipped_sharded_edge_and_each_shard_with_its_partitions(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    fleet = {name: service for name, service in services.items() if "profiles" in service}
    assert {tuple(service["profiles"]) for service in fleet.values()} == {("fleet",)}
    # Without the profile, the stack is the one above.
    assert set(services) - set(fleet) == {"sse-certs", "sse", "rabbitmq", "postgres"}
    partitions, backends = sharded_edge()
    table = shards_table()
    assert sorted(table) == list(range(partitions))
    shards = set(table.values())
    assert set(backends) == shards | {"sse_any"}
    # Anything but a subscribe may go to any instance of any shard.
    assert sorted(backends["sse_any"]) == sorted(a for shard in shards for a in backends[shard])
    subnet = ipaddress.ip_network(compose["networks"]["fleet"]["ipam"]["config"][0]["subnet"])
    by_address = {
        service["networks"]["fleet"]["ipv4_address"]: name for name, service in fleet.items()
    }
    assert all(ipaddress.ip_address(address) in subnet for address in by_address)
    edge_name = by_address.pop(environment(fleet["sse-a1"])["SSE_TRUSTED_PROXIES"])
    edge = fleet[edge_name]
    instances = []
    for shard in sorted(shards):
        for address in backends[shard]:
            host, port = address.rsplit(":", 1)
            name = by_address[host]
            instance = fleet[name]
            settings = environment(instance)
            assert settings["SSE_PORT"] == port
            without_files = {k: v for k, v in settings.items() if not k.endswith("_FILE")}
            config = load_config({**without_files, "SSE_CERTS_DIR": "."})
            assert config.rabbitmq_partitions == partitions
            assert config.partitions == tuple(p for p, s in sorted(table.items()) if s == shard)
            assert config.app_env == "prod" and config.rabbitmq_tls
            assert config.postgres_sslmode == "verify-full"
            assert config.trusted_proxies
            # Like the stack's server: its certificates, its secrets, the same gates.
            assert instance["depends_on"] == services["sse"]["depends_on"]
            assert mounts(instance)[settings["SSE_CERTS_DIR"]] == "sse-tls"
            assert set(instance["secrets"]) == set(services["sse"]["secrets"])
            assert "ports" not in instance, "browsers come through the edge"
            instances.append(name)
    assert len(instances) == 4 and set(instances) == set(by_address.values())
    # The edge runs the shipped files as they are, with the certificates where they say.
    assert edge["image"].startswith("haproxy:2.6")
    edge_mounts = mounts(edge)
    assert edge_mounts["/etc/haproxy/haproxy.cfg"] == "./deploy/haproxy/haproxy-sharded.cfg"
    assert edge_mounts["/etc/haproxy/shards.map"] == "./deploy/haproxy/shards.map"
    text, started = SHARDED_EDGE.read_text(), " ".join(edge["entrypoint"])
    assert "map_int(/etc/haproxy/shards.map)" in text
    assert "-f /etc/haproxy/haproxy.cfg" in started
    for path in ("/etc/haproxy/certs/sse.pem", "/etc/sse/certs/ca.pem", "/run/haproxy"):
        assert path in text and (path in started or path in edge["tmpfs"]), path
    assert not any("key" in source and "ca" in source for source in edge_mounts.values())
    assert published(edge) == {443: ""}
    assert set(edge["depends_on"]) == set(instances)


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
            **postgres_tls.settings(),
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
    scratch_database: str, tmp_path: Path
) -> None:
    role = f"sse_role_{uuid.uuid4().hex[:8]}"
    password_file = tmp_path / "password"
    password_file.write_text(new_password() + "\n")
    demo_user, demo_token = makefile_variable("DEMO_USERID"), makefile_variable("DEMO_TOKEN")
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
            "APP_DB_PASSWORD_FILE": str(password_file),
            "DEMO_USERID": demo_user,
            "DEMO_TOKEN": demo_token,
        },
        check=True,
        capture_output=True,
    )
    try:
        rows = run_sql(scratch_database, "SELECT uuid, sse_token FROM users", role=role)
        assert rows == [(demo_user, demo_token)]
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            run_sql(scratch_database, "INSERT INTO users VALUES ('a', 'b')", role=role)
        [(verifier,)] = run_sql(
            scratch_database, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{role}'"
        )
        # The password from the file (newline dropped), as PostgreSQL checks it.
        assert verifier.startswith("SCRAM-SHA-256$")
        assert scram_matches(verifier, password_file.read_text().rstrip("\n"))
        assert not scram_matches(verifier, password_file.read_text())
        triggers = run_sql(
            scratch_database,
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass"
            " AND NOT tgisinternal ORDER BY tgname",
        )
        assert triggers == [("users_sse_revocation",), ("users_sse_truncation",)]
    finally:
        run_sql(scratch_database, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


def scram_matches(verifier: str, password: str) -> bool:
    """Whether ``password`` is the one a PostgreSQL SCRAM-SHA-256 verifier was made from."""
    method, rest = verifier.split("$", 1)
    iterations_and_salt, keys = rest.split("$")
    iterations, salt = iterations_and_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return (
        method == "SCRAM-SHA-256"
        and base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key
    )


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


def write_definitions(
    directory: Path, sse_user: str, admin_user: str, queue: str
) -> tuple[Path, dict[str, str]]:
    """Run deploy/rabbitmq/write-definitions.sh as the rabbitmq container does; return the
    definitions file and each user's password file (each password ends in a newline, as
    `echo pw > file` leaves it)."""
    password_files = {}
    for user in (sse_user, admin_user):
        password_files[user] = str(directory / f"{user}.password")
        Path(password_files[user]).write_text(new_password() + "\n")
    output = directory / "definitions.json"
    subprocess.run(
        ["sh", str(REPOSITORY / "deploy/rabbitmq/write-definitions.sh"), str(output)],
        env={
            "PATH": os.environ["PATH"],
            "RABBITMQ_SSE_USER": sse_user,
            "RABBITMQ_SSE_PASSWORD_FILE": password_files[sse_user],
            "RABBITMQ_SSE_QUEUE": queue,
            "RABBITMQ_ADMIN_USER": admin_user,
            "RABBITMQ_ADMIN_PASSWORD_FILE": password_files[admin_user],
            "DEFINITIONS_OWNER": pwd.getpwuid(os.geteuid()).pw_name,
        },
        check=True,
        capture_output=True,
    )
    return output, password_files


def amqp_as(broker: RabbitMQServer, user: str, password_file: str) -> pika.BlockingConnection:
    password = Path(password_file).read_text().rstrip("\n")
    return pika.BlockingConnection(
        pika.ConnectionParameters(
            "127.0.0.1", broker.amqp_port, credentials=pika.PlainCredentials(user, password)
        )
    )


def refused(operation: Any) -> int:
    """The AMQP reply code of the channel error ``operation`` ends in (0: none)."""
    try:
        operation()
    except pika.exceptions.ChannelClosedByBroker as error:
        return int(error.reply_code)
    return 0


@pytest_twisted.ensureDeferred
async def test_the_stacks_rabbitmq_account_can_declare_and_consume_its_stream_and_nothing_else(
    tmp_path: Path,
    pki: Pki,
    postgres_tls: PostgresServer,
    rabbitmq_tls: RabbitMQServer,
    tls_environ: dict[str, str],
    browser: Browser,
) -> None:
    """The definitions the compose broker loads, imported into a real broker: the server
    runs as its account, and the account is refused whatever the server does not need."""
    suffix = uuid.uuid4().hex[:8]
    sse_user, admin_user, queue = f"sse_{suffix}", f"admin_{suffix}", f"messages_{suffix}"
    definitions, password_files = write_definitions(tmp_path, sse_user, admin_user, queue)
    # The stream queue, or the super stream of that name: the exchange and its partitions.
    assert json.loads(definitions.read_text())["permissions"][0] == {
        "user": sse_user,
        "vhost": "/",
        "configure": f"^{queue}(-[0-9]+)?$",
        "write": f"^{queue}-[0-9]+$",
        "read": f"^{queue}(-[0-9]+)?$",
    }
    assert definitions.stat().st_mode & 0o777 == 0o600
    rabbitmq_tls.rabbitmqctl("import_definitions", str(definitions))
    try:
        server = await start_server(
            {
                **tls_environ,
                "SSE_RABBITMQ_USERNAME": sse_user,
                "SSE_RABBITMQ_PASSWORD_FILE": password_files[sse_user],
                "SSE_RABBITMQ_QUEUE_NAME": queue,
            }
        )
        try:
            userid, token = add_subscriber(postgres_tls)
            _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
            # The administrator's password works too: it publishes.
            admin = amqp_as(rabbitmq_tls, admin_user, password_files[admin_user])
            admin.channel().basic_publish("", queue, json.dumps(found_contract(userid)).encode())
            admin.close()
            event = await tab.next_event()
            assert json.loads(event["data"]) == found_contract(userid)
        finally:
            await server.stop()
        # The same account runs a partitioned server: it declares, binds and consumes the
        # super stream of that name.
        partitioned = await start_server(
            {
                **tls_environ,
                "SSE_RABBITMQ_USERNAME": sse_user,
                "SSE_RABBITMQ_PASSWORD_FILE": password_files[sse_user],
                "SSE_RABBITMQ_QUEUE_NAME": queue,
                "SSE_RABBITMQ_PARTITIONS": "4",
                "SSE_RABBITMQ_INITIAL_CLUSTER_SIZE": "1",
            }
        )
        try:
            userid, token = add_subscriber(postgres_tls)
            _, tab = await browser.open(partitioned.subscribe_url(new_uuid(), userid, token))
            admin = amqp_as(rabbitmq_tls, admin_user, password_files[admin_user])
            body = json.dumps(found_contract(userid)).encode()
            admin.channel().basic_publish(queue, str(partition_of(userid, 4)), body)
            admin.close()
            event = await tab.next_event()
            assert json.loads(event["data"]) == found_contract(userid)
        finally:
            await partitioned.stop()
        account = amqp_as(rabbitmq_tls, sse_user, password_files[sse_user])
        try:
            publish = account.channel()
            publish.confirm_delivery()
            assert refused(lambda: publish.basic_publish("", queue, b"{}")) == 403
            # Nor into the super stream, through its exchange or straight to a partition.
            into_exchange, into_partition = account.channel(), account.channel()
            into_exchange.confirm_delivery()
            into_partition.confirm_delivery()
            assert refused(lambda: into_exchange.basic_publish(queue, "0", b"{}")) == 403
            assert refused(lambda: into_partition.basic_publish("", f"{queue}-0", b"{}")) == 403
            other = f"other_{suffix}"
            assert refused(lambda: account.channel().queue_declare(other)) == 403
            assert refused(lambda: account.channel().exchange_declare(other)) == 403
            # Each permission it has is needed: without configure, the declaration the
            # server makes is refused; without read, its consumer.
            rabbitmq_tls.rabbitmqctl("set_permissions", sse_user, "", "", f"^{queue}$")
            declare = account.channel()
            arguments = {"x-queue-type": "stream", "x-max-age": "1D"}
            assert (
                refused(lambda: declare.queue_declare(queue, durable=True, arguments=arguments))
                == 403
            )
            rabbitmq_tls.rabbitmqctl("set_permissions", sse_user, f"^{queue}$", "", "")
            consume = account.channel()
            consume.basic_qos(prefetch_count=10)
            assert refused(lambda: consume.basic_consume(queue, lambda *_: None)) == 403
        finally:
            account.close()
    finally:
        with suppress(RuntimeError):  # the server may never have declared it
            rabbitmq_tls.rabbitmqctl("delete_queue", queue)
        delete_super_stream(rabbitmq_tls.amqp_port, queue, 4)
        rabbitmq_tls.rabbitmqctl("delete_user", sse_user)
        rabbitmq_tls.rabbitmqctl("delete_user", admin_user)


def test_the_stack_runs_the_server_in_prod_with_verified_backends(
    services: dict[str, Any],
) -> None:
    settings = environment(services["sse"])
    # A fixed value: no variable can turn the stack back into dev (and its /demo page).
    assert services["sse"]["environment"]["SSE_APP_ENV"] == "prod"
    # The secret files exist inside the container only.
    without_files = {name: value for name, value in settings.items() if not name.endswith("_FILE")}
    config = load_config({**without_files, "SSE_CERTS_DIR": "."})
    assert config.app_env == "prod"
    assert config.allow_insecure_backends is False
    assert config.rabbitmq_tls is True
    assert config.postgres_sslmode == "verify-full"


def test_every_password_of_the_stack_is_a_compose_secret_read_through_a_file_variable(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    declared = compose["secrets"]
    for name, service in services.items():
        for variable, value in service.get("environment", {}).items():
            if "PASS" in variable:
                assert variable.endswith("_FILE"), f"{name}: {variable} is a plain value"
                assert declared[secret_file(service, str(value))]
            assert "$" not in str(value), f"{name}: {variable} comes from the caller"
    # Each secret is a file of its own under ./secrets, as `make secrets` writes them.
    made = re.search(r"^STACK_SECRETS := (.+)$", (REPOSITORY / "Makefile").read_text(), re.M)
    assert made is not None
    assert {name: secret["file"] for name, secret in declared.items()} == {
        name: f"./secrets/{name}" for name in made.group(1).split()
    }
    used = {name for service in services.values() for name in service.get("secrets", [])}
    assert used == set(declared)


def test_make_secrets_writes_each_password_once_readable_inside_a_private_directory(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "secrets"

    def make_secrets() -> str:
        return subprocess.run(
            ["make", "--no-print-directory", "secrets", f"SECRETS_DIR={directory}"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    make_secrets()
    passwords = {path.name: path.read_text() for path in directory.iterdir()}
    assert set(passwords) == set(yaml.safe_load(COMPOSE_FILE.read_text())["secrets"])
    assert len(set(passwords.values())) == len(passwords)
    assert all(len(password.strip()) >= 32 for password in passwords.values())
    assert directory.stat().st_mode & 0o777 == 0o700
    assert {path.stat().st_mode & 0o777 for path in directory.iterdir()} == {0o644}
    assert make_secrets() == ""
    assert {path.name: path.read_text() for path in directory.iterdir()} == passwords
