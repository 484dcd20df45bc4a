"""PostgresAuthenticator against real PostgreSQL servers over real sockets.

Most tests use the system PostgreSQL (plaintext, trust) with a database of their own; the
TLS and restart tests use the private TLS server of ``tests.conftest_backends``.
"""

from __future__ import annotations

import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, formatEvent
from zope.interface.verify import verifyObject

from sse_twisted._auth import PostgresAuthenticator
from sse_twisted._config import Config, load_config
from sse_twisted._tls import POSTGRES_CA_FILE
from sse_twisted.interfaces import BackendBusy, BackendUnavailable, IAuthenticator
from tests.backends import Pki, PostgresServer, free_port
from tests.logs import log_text, tracebacks, warnings_logged
from tests.waiting import bounded, wait_for

SYSTEM_POSTGRES: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
PASSWORD = f"pw-{secrets.token_hex(8)}"  # trust auth ignores it; it must never be logged
SERVER_WAIT_SECONDS = 90.0

ALICE = (str(uuid.uuid4()), str(uuid.uuid4()))
BOB = (str(uuid.uuid4()), str(uuid.uuid4()))


def _admin(sql: str, database: str = "postgres") -> None:
    with closing(psycopg2.connect(dbname=database, **SYSTEM_POSTGRES)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql)


@pytest.fixture(scope="module")
def plain_database() -> Iterator[str]:
    """A database of our own on the system PostgreSQL with ALICE and BOB in ``users``."""
    name = f"sse_test_{secrets.token_hex(4)}"
    _admin(f"CREATE DATABASE {name}")
    try:
        with (
            closing(psycopg2.connect(dbname=name, **SYSTEM_POSTGRES)) as connection,
            connection,
            connection.cursor() as cursor,
        ):
            cursor.execute("CREATE TABLE users (uuid varchar(36), sse_token varchar(36))")
            cursor.executemany("INSERT INTO users VALUES (%s, %s)", [ALICE, BOB])
        yield name
    finally:
        _admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(scope="module")
def tableless_database() -> Iterator[str]:
    """A database without a ``users`` table."""
    name = f"sse_test_{secrets.token_hex(4)}"
    _admin(f"CREATE DATABASE {name}")
    yield name
    _admin(f"DROP DATABASE {name} WITH (FORCE)")


def plain_config(certs_dir: Path, database: str, **options: str) -> Config:
    """Settings for the system PostgreSQL; ``options`` use the twistd option names."""
    return load_config(
        {},
        {
            "certs-dir": str(certs_dir),
            "postgres-host": SYSTEM_POSTGRES["host"],
            "postgres-port": str(SYSTEM_POSTGRES["port"]),
            "postgres-username": SYSTEM_POSTGRES["user"],
            "postgres-password": PASSWORD,
            "postgres-db-name": database,
            "postgres-sslmode": "disable",
            "postgres-pool-size": "2",
            "postgres-timeout-seconds": "2",
            **options,
        },
    )


def tls_config(certs_dir: Path, server: PostgresServer, **options: str) -> Config:
    """Settings for the private TLS PostgreSQL, verify-full unless overridden."""
    return load_config(
        {},
        {
            "certs-dir": str(certs_dir),
            "postgres-host": server.host,
            "postgres-port": str(server.port),
            "postgres-username": server.user,
            "postgres-db-name": server.database,
            "postgres-sslmode": "verify-full",
            "postgres-pool-size": "2",
            "postgres-timeout-seconds": "2",
            **options,
        },
    )


Starter = Callable[[Config], PostgresAuthenticator]


@pytest_twisted.async_yield_fixture
async def start() -> AsyncIterator[Starter]:
    """Start authenticators (without waiting for a connection); stopped after the test."""
    started: list[PostgresAuthenticator] = []

    def starter(config: Config) -> PostgresAuthenticator:
        authenticator = PostgresAuthenticator(config, reactor)
        authenticator.startService()
        started.append(authenticator)
        return authenticator

    yield starter
    for authenticator in started:
        if authenticator.running:
            await bounded(authenticator.stopService())


async def connected(authenticator: PostgresAuthenticator) -> PostgresAuthenticator:
    await wait_for(lambda: authenticator.connected, "a PostgreSQL connection")
    return authenticator


async def check(authenticator: PostgresAuthenticator, userid: str, nonce: str) -> bool:
    answer: bool = await bounded(authenticator.is_subscriber(userid, nonce))
    return answer


async def unavailable(authenticator: PostgresAuthenticator, userid: str, nonce: str) -> str:
    """The BackendUnavailable message of a check that must fail."""
    with pytest.raises(BackendUnavailable) as raised:
        await check(authenticator, userid, nonce)
    return str(raised.value)


# --- the plain system PostgreSQL ---


def test_provides_the_authenticator_interface(tmp_path: Path) -> None:
    authenticator = PostgresAuthenticator(plain_config(tmp_path, "unused"), reactor)
    assert verifyObject(IAuthenticator, authenticator)
    assert authenticator.connected is False  # nothing opens before startService


@pytest_twisted.ensureDeferred
async def test_known_pair_is_a_subscriber(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    assert await check(authenticator, *ALICE) is True
    assert await check(authenticator, *BOB) is True


@pytest_twisted.ensureDeferred
async def test_unknown_nonce_is_not_a_subscriber(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    assert await check(authenticator, ALICE[0], str(uuid.uuid4())) is False
    assert await check(authenticator, str(uuid.uuid4()), ALICE[1]) is False


@pytest_twisted.ensureDeferred
async def test_another_users_nonce_is_not_a_subscriber(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    assert await check(authenticator, ALICE[0], BOB[1]) is False
    assert await check(authenticator, BOB[0], ALICE[1]) is False


@pytest.mark.parametrize(
    "nonce",
    [
        "' OR '1'='1",
        "x' OR 1=1 --",
        "'; DROP TABLE users; --",
        "%s",
        "\\' OR sse_token LIKE '%",
        "\x00' OR '1'='1",  # NUL: psycopg2 refuses to send it, still just no match
        "\udcff",  # a lone surrogate cannot be encoded either
    ],
)
@pytest_twisted.ensureDeferred
async def test_injection_looking_input_is_just_a_non_match(
    start: Starter, plain_database: str, tmp_path: Path, nonce: str, log_events: Sequence[LogEvent]
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    assert await check(authenticator, ALICE[0], nonce) is False
    assert await check(authenticator, nonce, nonce) is False
    assert await check(authenticator, *ALICE) is True  # the table is intact
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_no_answer_within_the_timeout_is_backend_unavailable(
    start: Starter, plain_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    config = plain_config(tmp_path, plain_database, **{"postgres-timeout-seconds": "0.5"})
    authenticator = await connected(start(config))
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")  # held until rollback
        started = reactor.seconds()
        reason = await unavailable(authenticator, *ALICE)
        assert reactor.seconds() - started < 2
        assert reason == "no answer within 0.5 seconds"
        locker.rollback()
    # The abandoned query finishes in the background; its late answer is dropped quietly.
    assert await check(authenticator, *ALICE) is True
    assert [line for line in warnings_logged(log_events) if "no answer" in line] == [
        "cannot check a subscriber: no answer within 0.5 seconds"
    ]
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_cancelling_a_check_fails_it_with_cancelled_error_and_logs_nothing(
    start: Starter, plain_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        checking = authenticator.is_subscriber(*ALICE)
        checking.cancel()  # what the web resource does when the browser goes away
        with pytest.raises(CancelledError):
            await bounded(checking)
        locker.rollback()
    assert await check(authenticator, *ALICE) is True
    assert warnings_logged(log_events) == []
    assert tracebacks(log_events) == []


async def all_connected(start: Starter, config: Config) -> PostgresAuthenticator:
    """An authenticator for ``config`` once every connection of its pool is open."""
    authenticator = start(config)
    size = config.postgres_pool_size
    await wait_for(lambda: authenticator.live_connections == size, "every pool connection")
    return authenticator


@pytest_twisted.ensureDeferred
async def test_checks_cancelled_while_waiting_for_a_busy_pool_are_never_sent(
    start: Starter, plain_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    config = plain_config(tmp_path, plain_database, **{"postgres-timeout-seconds": "5"})
    authenticator = await all_connected(start, config)
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        busy = [authenticator.is_subscriber(*ALICE) for _ in range(2)]  # both connections
        waiting = [authenticator.is_subscriber(*ALICE) for _ in range(6)]
        assert (authenticator.queries, authenticator.waiting) == (2, 6)
        for leaving in waiting[:4]:
            leaving.cancel()  # what the web resource does when the browser goes away
        assert authenticator.waiting == 2
        locker.rollback()
    assert await bounded(gatherResults(busy + waiting[4:])) == [True] * 4
    assert authenticator.queries == 4  # the four that left were never sent
    for leaving in waiting[:4]:
        with pytest.raises(CancelledError):
            await leaving
    assert warnings_logged(log_events) == []


@pytest_twisted.ensureDeferred
async def test_checks_whose_wait_timed_out_are_never_sent(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    config = plain_config(tmp_path, plain_database, **{"postgres-timeout-seconds": "0.5"})
    authenticator = await all_connected(start, config)
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        checks = [authenticator.is_subscriber(*ALICE) for _ in range(5)]
        for checking in checks:
            with pytest.raises(BackendUnavailable):
                await bounded(checking)
        assert authenticator.waiting == 0
        # Two were sent at once. PostgreSQL's statement_timeout (the same 0.5 s, counted from
        # when it got the query) can end one before a late reactor fires a waiting check's
        # timeout, and that check is then sent (rarely, on a loaded machine). At least one
        # must have timed out in line for the test to say anything.
        sent = authenticator.queries
        assert 2 <= sent < len(checks)
        locker.rollback()
    # The sent ones finish in the background; those that timed out in line are gone.
    assert await check(authenticator, *ALICE) is True
    assert authenticator.queries == sent + 1


@pytest_twisted.ensureDeferred
async def test_past_max_pending_checks_a_check_is_refused_at_once_without_a_log_line(
    start: Starter, plain_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    options = {"postgres-pool-size": "1", "max-pending-auth-checks": "2"}
    authenticator = await all_connected(start, plain_config(tmp_path, plain_database, **options))
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        admitted = [authenticator.is_subscriber(*ALICE) for _ in range(3)]  # 1 sent, 2 wait
        refused = authenticator.is_subscriber(*BOB)
        # Answered at once: the browser is asked to come back (and counted) by the resource.
        with pytest.raises(BackendBusy, match="2 subscriber checks are waiting already"):
            await refused
        locker.rollback()
    assert await bounded(gatherResults(admitted)) == [True] * 3
    assert authenticator.queries == 3
    assert warnings_logged(log_events) == []


@pytest_twisted.ensureDeferred
async def test_the_readiness_probe_goes_ahead_of_waiting_checks(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    options = {"postgres-pool-size": "1", "max-pending-auth-checks": "3"}
    authenticator = await all_connected(start, plain_config(tmp_path, plain_database, **options))
    answered: list[str] = []
    with closing(psycopg2.connect(dbname=plain_database, **SYSTEM_POSTGRES)) as locker:
        with locker.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        checks = [authenticator.is_subscriber(*ALICE) for _ in range(4)]  # 1 sent, a full line
        probe = authenticator.probe()  # never refused, and first in line
        for label, checking in [("probe", probe)] + [
            (f"check {n}", c) for n, c in enumerate(checks)
        ]:
            checking.addCallback(lambda _, label=label: answered.append(label))
        locker.rollback()
    await bounded(gatherResults([*checks, probe]))
    assert answered == ["check 0", "probe", "check 1", "check 2", "check 3"]


@pytest_twisted.ensureDeferred
async def test_missing_users_table_is_unavailable_and_logged_as_an_error(
    start: Starter, tableless_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, tableless_database)))
    reason = await unavailable(authenticator, *ALICE)
    assert reason == 'relation "users" does not exist'
    errors = [event for event in log_events if event["log_level"].name == "error"]
    assert [formatEvent(event) for event in errors] == [
        "PostgreSQL rejects the subscriber query, check the users table: "
        'relation "users" does not exist'
    ]
    assert ALICE[1] not in log_text(log_events)  # psycopg2's full message quotes the query


@pytest_twisted.ensureDeferred
async def test_started_while_the_database_is_unreachable_answers_unavailable_quietly(
    start: Starter, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    config = plain_config(tmp_path, "sse", **{"postgres-port": str(free_port())})
    authenticator = start(config)  # must not raise although nothing listens
    # The first attempt and the immediate retry have both failed: the retry loop runs.
    await wait_for(
        lambda: sum("Connection refused" in line for line in warnings_logged(log_events)) >= 4,
        "two failed attempts per connection",
    )
    assert authenticator.connected is False
    reason = await unavailable(authenticator, *ALICE)
    assert reason == "no live connection to PostgreSQL (reconnecting)"
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_an_unresolvable_host_name_is_retried_in_the_background(
    start: Starter, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    # libpq fails this one inside connect(), before the reactor watches any socket.
    authenticator = start(plain_config(tmp_path, "sse", **{"postgres-host": "sse-test.invalid"}))
    await wait_for(
        lambda: (
            sum("could not translate host name" in line for line in warnings_logged(log_events))
            >= 4
        ),
        "two failed attempts per connection",
    )
    assert await unavailable(authenticator, *ALICE) == (
        "no live connection to PostgreSQL (reconnecting)"
    )
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_a_server_that_never_answers_fails_the_connect_after_the_timeout(
    start: Starter, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    silent = await bounded(
        TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
    )
    try:
        config = plain_config(
            tmp_path,
            "sse",
            **{"postgres-port": str(silent.getHost().port), "postgres-timeout-seconds": "0.3"},
        )
        authenticator = start(config)
        # Each connection's first attempt and its immediate retry: it keeps trying.
        await wait_for(
            lambda: (
                sum("no answer within 0.3" in line for line in warnings_logged(log_events)) >= 4
            ),
            "repeated connect timeouts",
        )
        assert authenticator.connected is False
        assert await unavailable(authenticator, *ALICE) == (
            "no live connection to PostgreSQL (reconnecting)"
        )
        await bounded(authenticator.stopService())
    finally:
        await bounded(silent.stopListening())
    assert tracebacks(log_events) == []


def our_backends(database: str) -> int:
    """How many sessions the server has open in ``database``."""
    with (
        closing(psycopg2.connect(dbname="postgres", **SYSTEM_POSTGRES)) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
        return int(cursor.fetchone()[0])


@pytest_twisted.ensureDeferred
async def test_connections_killed_by_the_server_are_reopened_without_tracebacks(
    start: Starter, plain_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    await wait_for(lambda: our_backends(plain_database) == 2, "both pool connections")
    _admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{plain_database}' AND pid <> pg_backend_pid()"
    )
    await wait_for(
        lambda: sum("lost connection" in line for line in warnings_logged(log_events)) == 2,
        "both connections noticed lost",
    )
    await wait_for(lambda: our_backends(plain_database) == 2, "both connections reopened")
    await connected(authenticator)
    assert await check(authenticator, *ALICE) is True
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_stop_service_closes_every_connection(
    start: Starter, plain_database: str, tmp_path: Path
) -> None:
    authenticator = await connected(start(plain_config(tmp_path, plain_database)))
    await wait_for(lambda: our_backends(plain_database) == 2, "both pool connections")
    stopping = authenticator.stopService()
    assert isinstance(stopping, Deferred)
    await bounded(stopping)
    assert authenticator.connected is False
    await wait_for(lambda: our_backends(plain_database) == 0, "the server to see them closed")


@pytest_twisted.ensureDeferred
async def test_logs_never_contain_the_nonce_or_the_password(
    start: Starter,
    plain_database: str,
    tableless_database: str,
    tmp_path: Path,
    log_events: Sequence[LogEvent],
) -> None:
    working = await connected(start(plain_config(tmp_path, plain_database)))
    broken = await connected(start(plain_config(tmp_path, tableless_database)))
    unreachable = start(plain_config(tmp_path, "sse", **{"postgres-port": str(free_port())}))
    assert await check(working, *ALICE) is True
    assert await check(working, ALICE[0], BOB[1]) is False
    await unavailable(broken, *ALICE)
    await unavailable(unreachable, *BOB)
    await bounded(working.stopService())
    text = log_text(log_events)
    assert "cannot check a subscriber" in text  # the failures were logged...
    for secret in (PASSWORD, ALICE[1], BOB[1]):
        assert secret not in text  # ...without the secrets


# --- the private TLS PostgreSQL ---


@pytest.fixture
def tls_subscriber(postgres_tls: PostgresServer) -> tuple[str, str]:
    """A new (userid, token) row in the TLS server's users table."""
    pair = (str(uuid.uuid4()), str(uuid.uuid4()))
    postgres_tls.execute("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", pair)
    return pair


def certs_with_postgres_ca(directory: Path, ca_certificate: Path) -> Path:
    """A certs dir whose PostgreSQL CA is ``ca_certificate``."""
    directory.mkdir()
    shutil.copyfile(ca_certificate, directory / POSTGRES_CA_FILE)
    return directory


@pytest_twisted.ensureDeferred
async def test_verify_full_with_the_right_ca_works(
    start: Starter, postgres_tls: PostgresServer, pki: Pki, tls_subscriber: tuple[str, str]
) -> None:
    assert (pki.directory / POSTGRES_CA_FILE).exists()
    authenticator = await connected(start(tls_config(pki.directory, postgres_tls)))
    assert await check(authenticator, *tls_subscriber) is True
    assert await check(authenticator, tls_subscriber[0], str(uuid.uuid4())) is False


@pytest_twisted.ensureDeferred
async def test_a_server_certificate_from_another_ca_is_refused(
    start: Starter,
    postgres_tls: PostgresServer,
    pki: Pki,
    tls_subscriber: tuple[str, str],
    tmp_path: Path,
    log_events: Sequence[LogEvent],
) -> None:
    certs_dir = certs_with_postgres_ca(tmp_path / "certs", pki.wrong_ca_certificate)
    authenticator = start(tls_config(certs_dir, postgres_tls))
    # Each connection's first attempt and its immediate retry: it keeps trying.
    await wait_for(
        lambda: (
            sum("certificate verify failed" in line for line in warnings_logged(log_events)) >= 4
        ),
        "repeated verification failures",
    )
    assert authenticator.connected is False
    await unavailable(authenticator, *tls_subscriber)
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_a_host_name_missing_from_the_certificate_is_refused(
    start: Starter,
    postgres_tls: PostgresServer,
    pki: Pki,
    tls_subscriber: tuple[str, str],
    log_events: Sequence[LogEvent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # libpq connects to PGHOSTADDR but checks the certificate against the host name.
    monkeypatch.setenv("PGHOSTADDR", "127.0.0.1")
    config = tls_config(pki.directory, postgres_tls, **{"postgres-host": "wrong-name.invalid"})
    authenticator = start(config)
    await wait_for(
        lambda: any(
            'does not match host name "wrong-name.invalid"' in line
            for line in warnings_logged(log_events)
        ),
        "the host name mismatch",
    )
    assert authenticator.connected is False
    await unavailable(authenticator, *tls_subscriber)


async def in_thread(function: Callable[[], object]) -> None:
    """Run a blocking server command while the reactor goes on serving."""
    await bounded(deferToThread(function), SERVER_WAIT_SECONDS)


@pytest_twisted.ensureDeferred
async def test_a_database_restart_is_survived_without_restarting_the_service(
    start: Starter,
    postgres_tls: PostgresServer,
    pki: Pki,
    tls_subscriber: tuple[str, str],
    log_events: Sequence[LogEvent],
) -> None:
    authenticator = await connected(start(tls_config(pki.directory, postgres_tls)))
    assert await check(authenticator, *tls_subscriber) is True
    await in_thread(postgres_tls.stop)
    try:
        await wait_for(lambda: not authenticator.connected, "the connections to die")
        await unavailable(authenticator, *tls_subscriber)
    finally:
        await in_thread(postgres_tls.start)
    await wait_for(lambda: authenticator.connected, "a reconnection", seconds=30)
    assert await check(authenticator, *tls_subscriber) is True
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_started_while_the_database_is_down_connects_once_it_is_up(
    start: Starter,
    postgres_tls: PostgresServer,
    pki: Pki,
    tls_subscriber: tuple[str, str],
    log_events: Sequence[LogEvent],
) -> None:
    await in_thread(postgres_tls.stop)
    try:
        authenticator = start(tls_config(pki.directory, postgres_tls))
        await unavailable(authenticator, *tls_subscriber)
    finally:
        await in_thread(postgres_tls.start)
    await wait_for(lambda: authenticator.connected, "the first connection", seconds=30)
    assert await check(authenticator, *tls_subscriber) is True
    assert tracebacks(log_events) == []
