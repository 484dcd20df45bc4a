"""Real TLS-only PostgreSQL and RabbitMQ servers for integration tests.

Each server runs from the installed binaries in its own temporary directory, on free ports,
with its output in a log file there. Startup waits for the server's own readiness signal and
a failed startup raises :class:`BackendStartupError` quoting the end of the log.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2

from sse_twisted.devcerts import (
    DEV_CERTIFICATE_FILES,
    create_certificate_authority,
    ensure_dev_certificates,
    write_certificate,
)

POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
USERS_SCHEMA = Path(__file__).parent.parent / "schema" / "users.sql"
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
STARTUP_TIMEOUT = 60

log = logging.getLogger(__name__)


class BackendStartupError(Exception):
    """A backend server did not become ready."""


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing uses now, for a server started later.

    It is drawn below the ephemeral range: a port the kernel handed out (bind to port 0)
    may be taken meanwhile as the source port of any outgoing connection on a busy
    machine, and the server's later bind then fails (a RabbitMQ node's distribution
    port did, with "dist_port_already_used").
    """
    first_ephemeral = _ephemeral_ports().start
    while True:
        port = random.randrange(20000, first_ephemeral) if first_ephemeral > 21000 else 0
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])


def _log_tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(no log at {path}: {error.strerror})"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def client_ssl_context(trusted_ca: Path, identity: tuple[Path, Path] | None) -> ssl.SSLContext:
    """A verifying client context trusting ``trusted_ca``, presenting ``(certificate, key)``."""
    context = ssl.create_default_context(cafile=str(trusted_ca))
    if identity is not None:
        certificate, key = identity
        context.load_cert_chain(str(certificate), str(key))
    return context


def _wait_until_accepting(
    port: int, timeout: float, tls: ssl.SSLContext | None = None, hostname: str = "localhost"
) -> None:
    """Return once ``port`` accepts a connection and, given ``tls``, completes a handshake.

    Only a refused connection is retried: a listener that accepts but fails the handshake
    is misconfigured and will not recover.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                if tls is not None:
                    tls.wrap_socket(connection, server_hostname=hostname).close()
            return
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise BackendStartupError(f"nothing accepts on 127.0.0.1:{port}") from None
            # Between attempts only: refusal is immediate, so without a pause this spins.
            time.sleep(0.05)


@dataclass(frozen=True)
class Pki:
    """Development PKI from ``ensure_dev_certificates`` plus an unrelated "wrong" CA."""

    directory: Path
    ca_certificate: Path
    client_certificate: Path
    client_key: Path
    wrong_ca_certificate: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        """Populate ``directory`` and describe it."""
        files = DEV_CERTIFICATE_FILES
        ensure_dev_certificates(directory)
        wrong_ca_certificate = directory / "wrong_ca.pem"
        write_certificate(
            wrong_ca_certificate, create_certificate_authority("Wrong CA").certificate
        )
        return cls(
            directory=directory,
            ca_certificate=directory / files.ca_certificate,
            client_certificate=directory / files.rabbitmq_client_certificate,
            client_key=directory / files.rabbitmq_client_key,
            wrong_ca_certificate=wrong_ca_certificate,
        )


@dataclass
class PostgresServer:
    """A PostgreSQL cluster that accepts TCP only over TLS, with database ``sse``.

    Root may not run PostgreSQL, so under root every server command runs as the ``postgres``
    OS user and the directory lives outside pytest's root-only temporary tree.
    """

    directory: Path
    port: int
    ca_certificate: Path
    host: str = "localhost"  # the name in the certificate, so verify-full can match it
    database: str = "sse"
    user: str = "postgres"

    def settings(self) -> dict[str, str]:
        """The server's ``SSE_POSTGRES_*`` host, port, user and database settings."""
        return {
            "SSE_POSTGRES_HOST": self.host,
            "SSE_POSTGRES_PORT": str(self.port),
            "SSE_POSTGRES_USERNAME": self.user,
            "SSE_POSTGRES_DB_NAME": self.database,
        }

    @property
    def data_directory(self) -> Path:
        """The cluster's PGDATA."""
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        """Where the server writes its log."""
        return self.directory / "postgres.log"

    @property
    def dsn(self) -> str:
        """libpq connection string with full certificate verification."""
        return (
            f"host={self.host} port={self.port} dbname={self.database} user={self.user} "
            f"sslmode=verify-full sslrootcert={self.ca_certificate}"
        )

    @classmethod
    def launch(cls, pki: Pki) -> PostgresServer:
        """Create, configure and start a cluster; the caller must :meth:`destroy` it."""
        server = cls(
            directory=Path(tempfile.mkdtemp(prefix="sse-test-postgres-")),
            port=free_port(),
            ca_certificate=pki.directory / DEV_CERTIFICATE_FILES.postgres_ca,
        )
        try:
            started = time.monotonic()
            server._initialise(pki)
            server.start()
            server._create_schema()
            log.info("PostgreSQL ready in %.1fs", time.monotonic() - started)
        except BaseException:
            server.destroy()
            raise
        return server

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        as_postgres: dict[str, Any] = {}
        if os.geteuid() == 0:
            as_postgres = {"user": "postgres", "group": "postgres", "extra_groups": []}
        return subprocess.run(
            command,
            cwd=self.directory,
            capture_output=True,
            text=True,
            check=False,
            **as_postgres,
        )

    @classmethod
    def launch_standby(cls, pki: Pki, primary: PostgresServer) -> PostgresServer:
        """A hot standby of ``primary`` (``pg_basebackup`` and streaming replication),
        started and serving reads; the caller must :meth:`destroy` it."""
        server = cls(
            directory=Path(tempfile.mkdtemp(prefix="sse-test-postgres-standby-")),
            port=free_port(),
            ca_certificate=primary.ca_certificate,
        )
        try:
            started = time.monotonic()
            certificate, key = server._install_certificates(pki)
            # The primary's files and settings, and -R: standby.signal and primary_conninfo.
            backup = server._run(
                str(POSTGRES_BIN / "pg_basebackup"),
                *("-D", str(server.data_directory), "-R", "-X", "stream", "-c", "fast"),
                "--no-sync",
                "-d",
                # No client certificate: without one named, libpq would look in $HOME,
                # root's under sudo-less root, which the postgres user may not read.
                f"host=127.0.0.1 port={primary.port} user={primary.user} sslmode=require "
                f"sslcert={server.directory / 'none.crt'} sslkey={server.directory / 'none.key'}",
            )
            if backup.returncode:
                raise BackendStartupError(f"pg_basebackup failed:\n{backup.stdout}{backup.stderr}")
            # Appended after the primary's own lines, so these win.
            with (server.data_directory / "postgresql.conf").open("a") as config:
                config.write(
                    f"port = {server.port}\n"
                    f"unix_socket_directories = '{server.directory}'\n"
                    f"ssl_cert_file = '{certificate}'\n"
                    f"ssl_key_file = '{key}'\n"
                )
            server.start()
            log.info("PostgreSQL standby ready in %.1fs", time.monotonic() - started)
        except BaseException:
            server.destroy()
            raise
        return server

    def _install_certificates(self, pki: Pki) -> tuple[Path, Path]:
        """Copy the server certificate and key where the server's OS user may read them."""
        files = DEV_CERTIFICATE_FILES
        certificate = self.directory / "server.crt"
        key = self.directory / "server.key"
        shutil.copyfile(pki.directory / files.postgres_server_certificate, certificate)
        shutil.copyfile(pki.directory / files.postgres_server_key, key)
        key.chmod(0o600)
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            for path in (self.directory, certificate, key):
                os.chown(path, account.pw_uid, account.pw_gid)
        return certificate, key

    def _initialise(self, pki: Pki) -> None:
        certificate, key = self._install_certificates(pki)
        initdb = self._run(
            str(POSTGRES_BIN / "initdb"),
            *("-D", str(self.data_directory), "-U", self.user, "-A", "trust"),
            *("--no-locale", "-E", "UTF8", "--no-sync", "--no-instructions"),
        )
        if initdb.returncode:
            raise BackendStartupError(f"initdb failed:\n{initdb.stdout}{initdb.stderr}")
        # Replaces initdb's file: TCP must be TLS, so plaintext TCP meets "reject".
        (self.data_directory / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostssl replication all 127.0.0.1/32 trust\n"
            "hostnossl all all 0.0.0.0/0 reject\n"
        )
        with (self.data_directory / "postgresql.conf").open("a") as config:
            config.write(
                f"listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.directory}'\n"
                f"ssl = on\n"
                f"ssl_cert_file = '{certificate}'\n"
                f"ssl_key_file = '{key}'\n"
                # Durability is worthless for a throwaway cluster and costs seconds.
                f"fsync = off\n"
                f"synchronous_commit = off\n"
                f"full_page_writes = off\n"
            )

    def _create_schema(self) -> None:
        with closing(psycopg2.connect(self.dsn, dbname="postgres")) as connection:
            connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {self.database}")
        # The project's own schema, revocation trigger included.
        self.execute(USERS_SCHEMA.read_text())

    def start(self) -> None:
        """Start the server and return once it accepts connections (``pg_ctl -w``)."""
        result = self._run(
            str(POSTGRES_BIN / "pg_ctl"),
            *("-D", str(self.data_directory), "-l", str(self.log_path)),
            *("-w", "-t", str(STARTUP_TIMEOUT), "start"),
        )
        if result.returncode:
            raise BackendStartupError(
                f"pg_ctl start failed:\n{result.stdout}{result.stderr}\n{_log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """Stop the server the way an administrator would (``pg_ctl stop -m fast``)."""
        result = self._run(
            str(POSTGRES_BIN / "pg_ctl"), "-D", str(self.data_directory), "-m", "fast", "stop"
        )
        if result.returncode:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}{result.stderr}")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in database ``sse`` over verified TLS; return its rows, if any."""
        with closing(psycopg2.connect(self.dsn)) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []

    def destroy(self) -> None:
        """Stop the server without a checkpoint, whatever its state, and delete its files."""
        if (self.data_directory / "postmaster.pid").exists():
            self._run(
                str(POSTGRES_BIN / "pg_ctl"),
                *("-D", str(self.data_directory), "-m", "immediate", "stop"),
            )
        shutil.rmtree(self.directory, ignore_errors=True)


def _unused_node_name() -> str:
    """A node name that no running Erlang node (a leftover test broker, say) has taken."""
    listing = subprocess.run(["epmd", "-names"], capture_output=True, text=True, check=False)
    while True:
        name = f"sse_test_{secrets.token_hex(4)}"
        if f"name {name} " not in listing.stdout:
            return f"{name}@localhost"


@dataclass
class RabbitMQServer:
    """A RabbitMQ node with a plain AMQP listener and an amqps listener requiring client certs.

    The node shares the machine's epmd but nothing else with the system broker: it has its own
    Erlang cookie (in a private ``HOME``) and ignores ``/etc/rabbitmq/rabbitmq-env.conf``.
    """

    directory: Path
    nodename: str
    amqp_port: int
    amqps_port: int
    _tls_probe: ssl.SSLContext = field(repr=False)
    host: str = "localhost"
    username: str = "guest"
    password: str = "guest"
    _distribution_port: int = field(default_factory=free_port, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log_path(self) -> Path:
        """The node's log: its standard output and error."""
        return self.directory / "rabbitmq.log"

    @property
    def _environment(self) -> dict[str, str]:
        loopback_only = "-kernel inet_dist_use_interface {127,0,0,1}"
        inherited = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("RABBITMQ_", "ERL_"))
        }
        return {
            **inherited,
            "HOME": str(self.directory / "home"),
            "RABBITMQ_CONF_ENV_FILE": str(self.directory / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self._distribution_port),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.directory / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_only,
            "RABBITMQ_CTL_ERL_ARGS": loopback_only,
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @classmethod
    def launch(cls, pki: Pki, directory: Path, cookie: str | None = None) -> RabbitMQServer:
        """Configure and boot a node in ``directory``; the caller must :meth:`terminate` it.

        Nodes that are to join one cluster share an Erlang ``cookie``; by default the node
        gets one of its own."""
        server = cls(
            directory=directory,
            nodename=_unused_node_name(),
            amqp_port=free_port(),
            amqps_port=free_port(),
            _tls_probe=client_ssl_context(
                pki.ca_certificate, (pki.client_certificate, pki.client_key)
            ),
        )
        try:
            started = time.monotonic()
            server._configure(pki, cookie or secrets.token_hex(16))
            server._boot()
            log.info("RabbitMQ ready in %.1fs", time.monotonic() - started)
        except BaseException:
            server.terminate()
            raise
        return server

    def _configure(self, pki: Pki, cookie: str) -> None:
        files = DEV_CERTIFICATE_FILES
        home = self.directory / "home"
        home.mkdir()
        cookie_file = home / ".erlang.cookie"
        cookie_file.write_text(cookie)
        cookie_file.chmod(0o400)  # Erlang refuses a cookie that others can read
        (self.directory / "rabbitmq-env.conf").touch()
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.ssl.default = 127.0.0.1:{self.amqps_port}\n"
            f"ssl_options.cacertfile = {pki.directory / files.ca_certificate}\n"
            f"ssl_options.certfile = {pki.directory / files.rabbitmq_server_certificate}\n"
            f"ssl_options.keyfile = {pki.directory / files.rabbitmq_server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
            # One log, on stdout: the file handler buffers, so its tail misses the last error.
            "log.file = false\n"
            "log.console = true\n"
            "log.console.use_colors = off\n"
        )

    def _boot(self) -> None:
        with self.log_path.open("ab") as output:  # after restart(), the earlier run stays
            # A session of its own lets terminate() signal the script and the VM together.
            self._process = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                cwd=self.directory,
                env=self._environment,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # "wait" follows the pid file, then distribution, then the boot of the application.
        waiter = subprocess.Popen(
            self._rabbitmqctl_command(
                "wait", str(self.directory / "rabbitmq.pid"), "--timeout", str(STARTUP_TIMEOUT)
            ),
            env=self._environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        while True:
            try:
                waiter_output, _ = waiter.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                # The waiter cannot tell a node that dies before writing its pid file.
                if self._process.poll() is not None:
                    waiter.kill()
                    waiter.communicate()
                    exit_status = self._process.returncode
                    raise BackendStartupError(
                        f"RabbitMQ exited with {exit_status}:\n{_log_tail(self.log_path)}"
                    ) from None
        if waiter.returncode:
            raise BackendStartupError(
                f"RabbitMQ did not boot:\n{waiter_output}\n{_log_tail(self.log_path)}"
            )
        try:
            self._wait_until_listening()
        except (OSError, BackendStartupError) as error:
            raise BackendStartupError(
                f"RabbitMQ booted but its listeners do not work ({error}); is the TLS "
                f"configuration in {self.directory / 'rabbitmq.conf'} right?\n"
                f"{_log_tail(self.log_path)}"
            ) from error

    def _wait_until_listening(self) -> None:
        _wait_until_accepting(self.amqp_port, STARTUP_TIMEOUT)
        # RabbitMQ reads its certificate and key only on the first handshake.
        _wait_until_accepting(self.amqps_port, STARTUP_TIMEOUT, self._tls_probe, self.host)

    def _rabbitmqctl_command(self, *arguments: str) -> list[str]:
        return [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.nodename, *arguments]

    def rabbitmqctl(self, *arguments: str) -> str:
        """Run ``rabbitmqctl`` against this node and return its output."""
        result = subprocess.run(
            self._rabbitmqctl_command(*arguments),
            env=self._environment,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def stop_app(self) -> None:
        """Stop the broker application, closing every connection, while the node lives on."""
        self.rabbitmqctl("stop_app")

    def start_app(self) -> None:
        """Start the broker application again; return once both listeners accept."""
        self.rabbitmqctl("start_app")
        self._wait_until_listening()

    def kill(self) -> None:
        """Kill the node at once (SIGKILL to the script and the Erlang VM), as a crash does:
        no connection is closed cleanly, and clients see their sockets reset.

        The node's metadata tables are flushed first, as on a node that has run for a few
        minutes: RabbitMQ 3.10 saves its Ra directory (dets) only every few minutes, and a
        node killed before that forgets its stream coordinator, so that no stream queue
        declared since works again (``home node ... is down``) until it is deleted.
        """
        assert self._process is not None
        self.rabbitmqctl("eval", "[dets:sync(Table) || Table <- dets:all()].")
        os.killpg(self._process.pid, signal.SIGKILL)
        self._process.wait()

    def restart(self) -> None:
        """Boot the node again after :meth:`kill`, on the same ports and data; return once
        both listeners accept."""
        # A stale pid file would make "rabbitmqctl wait" watch the dead VM.
        (self.directory / "rabbitmq.pid").unlink(missing_ok=True)
        self._boot()

    def terminate(self) -> None:
        """Shut the node down (SIGTERM is a clean shutdown), killing it if that hangs."""
        if self._process is None:
            return
        with suppress(ProcessLookupError):  # the node may have died on its own
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()


@dataclass
class RabbitMQCluster:
    """Nodes of :class:`RabbitMQServer` joined into one RabbitMQ cluster.

    They boot side by side, each in a directory of its own under ``directory``, sharing an
    Erlang cookie; every node but the first then joins the first (``stop_app``, ``reset``,
    ``join_cluster``, ``start_app``).
    """

    directory: Path
    nodes: list[RabbitMQServer] = field(default_factory=list)

    @classmethod
    def launch(cls, pki: Pki, size: int = 3) -> RabbitMQCluster:
        """Boot and join ``size`` nodes; the caller must :meth:`destroy` the cluster."""
        cluster = cls(Path(tempfile.mkdtemp(prefix="sse-test-rabbitmq-cluster-")))
        cookie = secrets.token_hex(16)
        started = time.monotonic()
        try:
            directories = [cluster.directory / f"node-{index}" for index in range(size)]
            for directory in directories:
                directory.mkdir()
            with ThreadPoolExecutor(size) as pool:
                booting = [
                    pool.submit(RabbitMQServer.launch, pki, directory, cookie)
                    for directory in directories
                ]
                # Every node that booted is kept, to be stopped, before a failure is raised.
                for future in booting:
                    with suppress(Exception):
                        cluster.nodes.append(future.result())
                for future in booting:
                    future.result()
            seed = cluster.nodes[0]
            for node in cluster.nodes[1:]:
                node.rabbitmqctl("stop_app")
                node.rabbitmqctl("reset")
                node.rabbitmqctl("join_cluster", seed.nodename)
                node.start_app()
            log.info("RabbitMQ cluster of %d ready in %.1fs", size, time.monotonic() - started)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def destroy(self) -> None:
        """Shut every node down, whatever its state, and delete their files."""
        for node in self.nodes:
            node.terminate()
        shutil.rmtree(self.directory, ignore_errors=True)
