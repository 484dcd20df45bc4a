"""What the bench runs against: certificates, a database of users, queues, the server process.

Everything is made for one bench run and removed after it: a database ``sse_bench_<hex>`` on
the local PostgreSQL, stream queues ``sse-bench-<hex>-<n>`` on the local RabbitMQ, and a
temporary directory with the certificates and the server's log files.

The server is sse-twisted (``twistd sse-server``) or the reference server
(``uvicorn bench.reference.app:app``), started alike by L{server_process}: same certificates
and chain, database, pool size, queue settings and heartbeat interval.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg2

from sse_twisted.devcerts import ensure_dev_certificates

__all__ = [
    "REFERENCE",
    "SERVERS",
    "SSE_TWISTED",
    "BenchEnvironment",
    "ProcessSample",
    "ReferenceServerProcess",
    "ServerProcess",
    "raise_file_limit",
    "sample",
    "server_process",
]

REPOSITORY = Path(__file__).resolve().parent.parent
SCHEMA = REPOSITORY / "schema" / "users.sql"
TWISTD = Path(sys.executable).parent / "twistd"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_SCHEDSTAT = Path("/proc/self/schedstat").exists()
_POOL_SIZE = 4
_PR_SET_PDEATHSIG = 1
_AUTH_CHECKS_LIMIT = 100_000

SSE_TWISTED = "sse-twisted"
REFERENCE = "reference"
SERVERS = (SSE_TWISTED, REFERENCE)


def raise_file_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _server_process_setup(soft_file_limit: int | None = None) -> None:
    """In the forked server: the file limit raised (or its soft limit set to
    ``soft_file_limit``, as a shell's would be), and SIGTERM when the bench dies."""
    hard = raise_file_limit()
    if soft_file_limit is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft_file_limit, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """CPU seconds (user + system), resident memory and wake-ups of a process at one instant.

    ``wake_ups`` counts the main thread's voluntary context switches: for a ``twistd``, each
    time its reactor waited for something (``epoll_wait`` that blocked) and woke again.
    """

    at: float
    cpu_seconds: float
    rss_kib: int
    wake_ups: int


def _cpu_seconds(pid: int) -> float:
    """The CPU time of ``pid``'s threads, to the nanosecond (each ``/proc/<pid>/task/*/
    schedstat``), where ``/proc/<pid>/stat`` counts 10 ms clock ticks: too coarse for a few
    seconds of an idle process. A thread that ends takes its time with it; the servers'
    threads live as long as they do. Falls back to the ticks where there is no schedstat."""
    if not _SCHEDSTAT:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            with open(task / "schedstat", "rb") as schedstat:
                total += int(schedstat.read().split()[0])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
    return total / 1e9


def sample(pid: int) -> ProcessSample:
    """Read the CPU time of ``pid``'s threads and ``/proc/<pid>/status`` (VmRSS,
    voluntary_ctxt_switches)."""
    cpu = _cpu_seconds(pid)
    rss = wake_ups = 0
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith(b"voluntary_ctxt_switches:"):
                wake_ups = int(line.split()[1])
    return ProcessSample(time.monotonic(), cpu, rss, wake_ups)


def _listening_inodes(port: int) -> set[str]:
    """The inodes of the sockets listening on TCP ``port`` (``/proc/net/tcp``, tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address (hex ip:port), state 0A is LISTEN, inode is the 10th field.
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    return inodes


def broker_pid(port: int = 5672) -> int | None:
    """The pid of the RabbitMQ Erlang VM listening on ``port``, to report the broker's CPU
    beside the server's: not any ``beam.smp`` (tests start brokers of their own)."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "beam.smp":
                    continue
                if any(os.readlink(fd) in sockets for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
            except OSError:
                continue
    return None


@dataclass
class BenchEnvironment:
    """The database, users, certificates and queue names of one bench run."""

    users: int
    directory: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sse-bench-")))
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    database: str = ""
    userids: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)

    @property
    def certs(self) -> Path:
        return self.directory / "certs"

    @property
    def ca_file(self) -> Path:
        return self.certs / "dev_ca.pem"

    @property
    def certificate_chain(self) -> Path:
        """``cert.pem`` then ``ca.pem`` in one file: the chain sse-twisted sends, for uvicorn."""
        chain = self.directory / "reference-chain.pem"
        if not chain.exists():
            chain.write_bytes(
                (self.certs / "cert.pem").read_bytes() + (self.certs / "ca.pem").read_bytes()
            )
        return chain

    def set_up(self) -> None:
        """Certificates (ECDSA P-256), then the database with ``users`` rows bulk-loaded."""
        ensure_dev_certificates(self.certs)
        self.database = f"sse_bench_{self.run_id}"
        self.userids = [str(uuid.uuid4()) for _ in range(self.users)]
        self.tokens = [str(uuid.uuid4()) for _ in range(self.users)]
        admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{self.database}"')
        admin.close()
        rows = io.StringIO(
            "".join(f"{u}\t{t}\n" for u, t in zip(self.userids, self.tokens, strict=True))
        )
        with (
            psycopg2.connect(host="127.0.0.1", user="postgres", dbname=self.database) as db,
            db.cursor() as cursor,
        ):
            cursor.execute(SCHEMA.read_text())
            cursor.copy_from(rows, "users", columns=("uuid", "sse_token"))
            cursor.execute("ANALYZE users")

    def tear_down(self) -> None:
        """Drop the database and the queues, remove the directory; never raises."""
        if self.database:
            try:
                admin = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
                admin.autocommit = True
                with admin.cursor() as cursor:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
                admin.close()
            except psycopg2.Error as error:
                print(f"bench: cannot drop {self.database}: {error}", file=sys.stderr)
        if self.queues or self.exchanges:
            try:
                connection = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))
                channel = connection.channel()
                for queue in self.queues:
                    channel.queue_delete(queue)
                for exchange in self.exchanges:
                    channel.exchange_delete(exchange)
                connection.close()
            except pika.exceptions.AMQPError as error:
                print(
                    f"bench: cannot delete queues {self.queues} or exchanges {self.exchanges}: "
                    f"{error!r}",
                    file=sys.stderr,
                )
        shutil.rmtree(self.directory, ignore_errors=True)

    def new_queue(self) -> str:
        """A queue name of this run, deleted by L{tear_down}."""
        name = f"sse-bench-{self.run_id}-{len(self.queues)}"
        self.queues.append(name)
        return name

    def new_super_stream(self, partitions: int) -> str:
        """A super stream name of this run (``SSE_RABBITMQ_QUEUE_NAME`` with
        ``SSE_RABBITMQ_PARTITIONS``): its exchange and partition queues, which the server
        declares, are deleted by L{tear_down}."""
        name = f"sse-bench-{self.run_id}-s{len(self.exchanges)}"
        self.exchanges.append(name)
        self.queues.extend(f"{name}-{number}" for number in range(partitions))
        return name

    def users_file(self, count: int, start: int = 0) -> Path:
        """A file of ``count`` userids from ``start``, one a line, for the publisher."""
        path = self.directory / f"users-{start}-{count}.txt"
        path.write_text("\n".join(self.userids[start : start + count]) + "\n")
        return path

    def subscribe_path(self, user: int) -> bytes:
        """The path a browser of user number ``user`` opens (a fresh topic each time)."""
        return f"/subscribe/{uuid.uuid4()}/{self.userids[user]}/{self.tokens[user]}".encode("ascii")


@dataclass
class ServerProcess:
    """``twistd -n --pidfile= sse-server`` against the bench's database and a fresh queue."""

    environment: BenchEnvironment
    name: str
    source: Path | None = None
    extra_environ: dict[str, str] = field(default_factory=dict)
    soft_file_limit: int | None = None
    process: asyncio.subprocess.Process | None = None
    port: int = 0
    queue: str = ""
    log_lines: list[dict[str, Any]] = field(default_factory=list)
    ready_at_line: int = 0
    _consuming: bool = False
    _databases: int = 0

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.environment.directory / f"server-{self.name}.log"

    def environ(self) -> dict[str, str]:
        environ = {
            "PATH": os.environ["PATH"],
            "SSE_APP_ENV": "dev",
            "SSE_PORT": "0",
            "SSE_LISTEN_ADDRESS": "127.0.0.1",
            "SSE_CERTS_DIR": str(self.environment.certs),
            "SSE_POSTGRES_HOST": "127.0.0.1",
            "SSE_POSTGRES_PORT": "5432",
            "SSE_POSTGRES_USERNAME": "postgres",
            "SSE_POSTGRES_DB_NAME": self.environment.database,
            "SSE_POSTGRES_SSLMODE": "disable",
            "SSE_POSTGRES_POOL_SIZE": str(_POOL_SIZE),
            "SSE_RABBITMQ_TLS": "false",
            "SSE_RABBITMQ_HOST": "127.0.0.1",
            "SSE_RABBITMQ_QUEUE_NAME": self.queue,
            "SSE_HEARTBEAT_SECONDS": "15",
            # No metrics listener: its default port (9464) would collide with any other server
            # on the machine (a test suite's, the compose stack's) and fail the start.
            "SSE_METRICS_PORT": "0",
            **self.extra_environ,
        }
        if self.source is not None:
            # A copy of the tree (sse_twisted/ and twisted/plugins/) shadows the installed one.
            environ["PYTHONPATH"] = str(self.source)
        return environ

    def command(self) -> list[str]:
        return [str(TWISTD), "-n", "--pidfile=", "sse-server"]

    async def start(self, timeout: float = 60.0) -> None:
        """Spawn the server; return once it listens, consumes and has its database pool.

        It consumes a fresh queue of the run unless ``queue`` was set (several servers
        sharing a stream)."""
        self.queue = self.queue or self.environment.new_queue()
        with open(self.log_path, "wb") as log, open(self.log_path.with_suffix(".err"), "wb") as err:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(),
                env=self.environ(),
                cwd=self.environment.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=err,
                preexec_fn=functools.partial(_server_process_setup, self.soft_file_limit),
            )
        deadline = time.monotonic() + timeout
        while not self._ready(self.read_log()):
            if self.process.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"server did not become ready:\n{self.tail()}")
            await asyncio.sleep(0.05)
        self.ready_at_line = len(self.log_lines)

    def _ready(self, records: list[dict[str, Any]]) -> bool:
        """Whether the server is ready, given the log lines written since the last call."""
        for record in records:
            message = record.get("message", "")
            if message.startswith("listening on"):
                self.port = record["port"]
            elif message.startswith("consuming "):
                self._consuming = True
            elif message.startswith("connected to PostgreSQL"):
                self._databases += 1
        return bool(self.port and self._consuming and self._databases >= _POOL_SIZE)

    def read_log(self) -> list[dict[str, Any]]:
        """Parse the log lines written since the last call."""
        already = len(self.log_lines)
        lines = self.log_path.read_bytes().splitlines()
        for line in lines[already:]:
            try:
                self.log_lines.append(json.loads(line))
            except ValueError:
                self.log_lines.append({"message": line.decode("utf-8", "replace")})
        return self.log_lines[already:]

    def problems(self) -> list[str]:
        """Warnings and errors logged since the server became ready (start-up's are expected:
        plaintext links to the backends)."""
        self.read_log()
        return [
            str(line.get("message", ""))[:200]
            for line in self.log_lines[self.ready_at_line :]
            if line.get("@level") in ("warn", "error", "critical")
        ]

    def tail(self) -> str:
        text = self.log_path.read_text(errors="replace")[-3000:]
        errors = self.log_path.with_suffix(".err").read_text(errors="replace")[-3000:]
        return text + errors

    def sample(self) -> ProcessSample:
        return sample(self.pid)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 seconds."""
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


_UVICORN_RUNNING = re.compile(r"Uvicorn running on https://[^ ]+:(\d+) ")
_UVICORN_PROBLEM = ("WARNING:", "ERROR:", "CRITICAL:")


@dataclass
class ReferenceServerProcess(ServerProcess):
    """``uvicorn bench.reference.app:app`` with TLS, as a user would run the reference server.

    uvicorn logs to stderr (its access log to stdout); it starts listening, and says on which
    port, only once the app's start-up, database pool and queue consumer included, is done.
    ``source`` does not apply: the reference is always this tree's.
    """

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.reference.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ssl-keyfile",
            str(self.environment.certs / "key.pem"),
            "--ssl-certfile",
            str(self.environment.certificate_chain),
            "--timeout-graceful-shutdown",
            "5",
        ]

    def environ(self) -> dict[str, str]:
        environ = super().environ()
        environ["PYTHONPATH"] = str(REPOSITORY)
        return environ

    def read_log(self) -> list[dict[str, Any]]:
        """Parse the lines uvicorn and the app wrote to stderr since the last call."""
        already = len(self.log_lines)
        lines = self.log_path.with_suffix(".err").read_bytes().splitlines()
        for line in lines[already:]:
            self.log_lines.append({"message": line.decode("utf-8", "replace")})
        return self.log_lines[already:]

    def _ready(self, records: list[dict[str, Any]]) -> bool:
        for record in records:
            running = _UVICORN_RUNNING.search(record["message"])
            if running:
                self.port = int(running.group(1))
        return bool(self.port)

    def problems(self) -> list[str]:
        self.read_log()
        return [
            str(line["message"])[:200]
            for line in self.log_lines[self.ready_at_line :]
            if str(line["message"]).startswith(_UVICORN_PROBLEM)
        ]


def server_process(
    server: str,
    environment: BenchEnvironment,
    name: str,
    source: Path | None = None,
    extra_environ: dict[str, str] | None = None,
) -> ServerProcess:
    """A L{ServerProcess} of ``server`` (one of L{SERVERS}) for the scenarios, not yet started.

    sse-twisted's limits on auth checks in flight, per client address (4) and in all (256),
    are lifted: the generator is one address standing for thousands of browsers, and S4
    opens 2,000 at once; at the defaults it turns part of them away, which the reference,
    without such limits, does not.
    """
    if server == REFERENCE:
        return ReferenceServerProcess(environment, f"reference-{name}", None, extra_environ or {})
    unlimited = {
        "SSE_MAX_AUTH_CHECKS_PER_CLIENT": str(_AUTH_CHECKS_LIMIT),
        "SSE_MAX_PENDING_AUTH_CHECKS": str(_AUTH_CHECKS_LIMIT),
    }
    return ServerProcess(environment, name, source, unlimited | (extra_environ or {}))


@contextmanager
def environment(users: int) -> Iterator[BenchEnvironment]:
    """A set-up L{BenchEnvironment}, torn down at the end."""
    bench = BenchEnvironment(users)
    try:
        bench.set_up()
        yield bench
    finally:
        bench.tear_down()
