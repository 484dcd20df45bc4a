"""Revocation over real PostgreSQL: the trigger of schema/users.sql, the RevocationListener
(including its re-LISTEN after the server kills its connection), and a live stream closed
end to end when its user's row goes."""

from __future__ import annotations

import json
import secrets
import select
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock
from twisted.logger import LogEvent
from twisted.web.test.requesthelper import DummyRequest

from sse_twisted._auth_cache import CachingAuthenticator
from sse_twisted._config import Config, load_config
from sse_twisted._revocation import CHANNEL, RevocationEnforcer, RevocationListener
from sse_twisted._streams import EventStream, StreamRegistry
from sse_twisted.interfaces import BackendUnavailable
from tests.backends import PostgresServer, RabbitMQServer
from tests.browser import Browser
from tests.fakes import ImmediateAuthenticator
from tests.in_process_server import RunningServer, start_server
from tests.logs import lines_with, log_text, tracebacks, warnings_logged
from tests.publishing import found_contract, publish
from tests.secrets_tracking import new_token, new_uuid
from tests.subscribers import add_local_subscriber, add_subscriber
from tests.waiting import bounded, wait_for

SCHEMA = Path(__file__).parent.parent / "schema" / "users.sql"
WAIT_SECONDS = 10.0
SENTINEL = "sentinel"


def connect(database: str) -> Any:
    connection = psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database)
    connection.autocommit = True
    return connection


def sql(database: str, statement: str, parameters: tuple[Any, ...] = ()) -> None:
    with closing(connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(statement, parameters)


def new_user(database: str) -> tuple[str, str]:
    pair = (str(uuid.uuid4()), str(uuid.uuid4()))
    sql(database, "INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", pair)
    return pair


def wait_for_sentinel(listener: Any, seconds: float = WAIT_SECONDS) -> list[str]:
    """The payloads on the channel before the sentinel, waiting on the socket, not sleeping."""
    payloads: list[str] = []
    deadline = time.monotonic() + seconds
    while True:
        listener.poll()
        while listener.notifies:
            notify = listener.notifies.pop(0)
            assert notify.channel == CHANNEL
            if notify.payload == SENTINEL:
                return payloads
            payloads.append(notify.payload)
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([listener], [], [], left)[0]:
            raise AssertionError(f"no sentinel within {seconds} s; got {payloads}")


def notifications_of(database: str, *statements: tuple[str, tuple[Any, ...]]) -> list[str]:
    """What the trigger sends on the channel while ``statements`` run, each in its own
    transaction, in order."""
    with closing(connect(database)) as listener:
        listener.cursor().execute(f"LISTEN {CHANNEL}")
        with closing(connect(database)) as writer, writer.cursor() as cursor:
            for statement, parameters in statements:
                cursor.execute(statement, parameters)
            # Notifications arrive in commit order: everything before it has arrived.
            cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, SENTINEL))
        return wait_for_sentinel(listener)


@pytest.fixture
def database(local_database: dict[str, str]) -> str:
    return local_database["SSE_POSTGRES_DB_NAME"]


# --- the trigger ---


def test_deleting_a_row_notifies_its_uuid(database: str) -> None:
    userid, _ = new_user(database)
    assert notifications_of(database, ("DELETE FROM users WHERE uuid = %s", (userid,))) == [userid]


def test_changing_the_token_notifies_the_uuid_but_never_the_token(database: str) -> None:
    userid, token = new_user(database)
    new_token = str(uuid.uuid4())
    payloads = notifications_of(
        database, ("UPDATE users SET sse_token = %s WHERE uuid = %s", (new_token, userid))
    )
    assert payloads == [userid]
    assert token not in payloads and new_token not in payloads


def test_changing_the_uuid_notifies_the_old_uuid(database: str) -> None:
    userid, _ = new_user(database)
    moved = str(uuid.uuid4())
    statement = ("UPDATE users SET uuid = %s WHERE uuid = %s", (moved, userid))
    assert notifications_of(database, statement) == [userid]


def test_inserts_and_updates_that_change_nothing_notify_nothing(database: str) -> None:
    userid, token = new_user(database)
    payloads = notifications_of(
        database,
        ("INSERT INTO users (uuid, sse_token) VALUES (%s, %s)", (str(uuid.uuid4()), "t")),
        ("UPDATE users SET sse_token = %s WHERE uuid = %s", (token, userid)),
        ("DELETE FROM users WHERE uuid = %s", (str(uuid.uuid4()),)),  # no such row
    )
    assert payloads == []


def test_truncating_users_notifies_a_star_for_everyone(own_database: str) -> None:
    new_user(own_database)
    assert notifications_of(own_database, ("TRUNCATE users", ())) == ["*"]


def test_the_schema_file_can_be_applied_again(database: str) -> None:
    sql(database, SCHEMA.read_text())
    sql(database, SCHEMA.read_text())
    with closing(connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'users'::regclass AND NOT tgisinternal"
        )
        assert cursor.fetchone() == (2,)  # the row trigger and the TRUNCATE one
    userid, _ = new_user(database)
    assert notifications_of(database, ("DELETE FROM users WHERE uuid = %s", (userid,))) == [userid]


# --- the listener ---


class Recorder:
    """The listener's callbacks, as queues the test waits on."""

    def __init__(self) -> None:
        self.revoked: DeferredQueue[str] = DeferredQueue()
        self.resynchronised = 0

    def on_revoked(self, userid: str) -> None:
        self.revoked.put(userid)

    def on_resynchronised(self) -> None:
        self.resynchronised += 1

    async def next_revoked(self) -> str:
        userid: str = await bounded(self.revoked.get(), WAIT_SECONDS)
        return userid

    def nothing_pending(self) -> bool:
        return not self.revoked.pending


def config_for(database: str, tmp_path: Path, timeout_seconds: str = "2") -> Config:
    return load_config(
        {},
        {
            "certs-dir": str(tmp_path),
            "postgres-host": "127.0.0.1",
            "postgres-port": "5432",
            "postgres-username": "postgres",
            "postgres-db-name": database,
            "postgres-sslmode": "disable",
            "postgres-timeout-seconds": timeout_seconds,
        },
    )


Starter = Callable[[Config], tuple[RevocationListener, Recorder]]


@pytest_twisted.async_yield_fixture
async def start() -> AsyncIterator[Starter]:
    """Start listeners (without waiting for LISTEN); stopped after the test."""
    started: list[RevocationListener] = []

    def starter(config: Config) -> tuple[RevocationListener, Recorder]:
        recorder = Recorder()
        listener = RevocationListener(
            config, reactor, recorder.on_revoked, on_resynchronised=recorder.on_resynchronised
        )
        listener.startService()
        started.append(listener)
        return listener, recorder

    yield starter
    for listener in started:
        if listener.running:
            await listener.stopService()


async def listening(listener: RevocationListener) -> RevocationListener:
    await wait_for(lambda: listener.listening, "LISTEN")
    return listener


def listener_backends(database: str) -> list[int]:
    with closing(connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query = %s",
            (database, f"LISTEN {CHANNEL}"),
        )
        return [pid for (pid,) in cursor.fetchall()]


@pytest_twisted.ensureDeferred
async def test_the_listener_delivers_the_userid_of_a_deleted_row(
    start: Starter, database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    listener, recorder = start(config_for(database, tmp_path))
    await listening(listener)
    assert recorder.resynchronised == 1  # once LISTENing: streams may predate it
    userid, _ = new_user(database)
    sql(database, "DELETE FROM users WHERE uuid = %s", (userid,))
    assert await recorder.next_revoked() == userid
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_the_listener_delivers_a_token_change(
    start: Starter, database: str, tmp_path: Path
) -> None:
    listener, recorder = start(config_for(database, tmp_path))
    await listening(listener)
    userid, _ = new_user(database)
    sql(database, "UPDATE users SET sse_token = %s WHERE uuid = %s", (str(uuid.uuid4()), userid))
    assert await recorder.next_revoked() == userid


@pytest_twisted.ensureDeferred
async def test_a_payload_that_is_not_a_uuid_is_ignored_with_a_warning(
    start: Starter, database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    listener, recorder = start(config_for(database, tmp_path))
    await listening(listener)
    userid = str(uuid.uuid4())
    sql(database, "SELECT pg_notify(%s, %s)", (CHANNEL, "'; DROP TABLE users; --"))
    sql(database, "SELECT pg_notify(%s, %s)", (CHANNEL, ""))
    sql(database, "SELECT pg_notify(%s, %s)", (CHANNEL, userid.upper()))
    # Delivered in order: the valid one comes after the two ignored.
    assert await recorder.next_revoked() == userid
    assert recorder.nothing_pending()
    ignored = [line for line in warnings_logged(log_events) if "not a user id" in line]
    assert ignored == [
        'ignored a revocation whose payload is not a user id: "\'; DROP TABLE users; --"',
        "ignored a revocation whose payload is not a user id: ''",
    ]
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_a_star_asks_to_resynchronise_everything(
    start: Starter, database: str, tmp_path: Path
) -> None:
    listener, recorder = start(config_for(database, tmp_path))
    await listening(listener)
    sql(database, "SELECT pg_notify(%s, %s)", (CHANNEL, "*"))
    await wait_for(lambda: recorder.resynchronised == 2, "the resynchronisation")
    assert recorder.nothing_pending()


@pytest_twisted.ensureDeferred
async def test_a_killed_connection_listens_again_and_still_delivers(
    start: Starter, database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    listener, recorder = start(config_for(database, tmp_path))
    await listening(listener)
    [backend] = listener_backends(database)
    sql(database, "SELECT pg_terminate_backend(%s)", (backend,))
    # Revocations made while it was away may be lost: the caller is told to resynchronise
    # once it LISTENs again (which can be too quick for a poll to see it not listening).
    await wait_for(lambda: recorder.resynchronised == 2, "a second LISTEN")
    assert listener.listening
    assert listener_backends(database) not in ([], [backend])

    userid, _ = new_user(database)
    sql(database, "DELETE FROM users WHERE uuid = %s", (userid,))
    assert await recorder.next_revoked() == userid
    assert any("lost connection to PostgreSQL" in line for line in warnings_logged(log_events))
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_a_database_that_is_missing_at_start_is_listened_to_once_it_exists(
    start: Starter, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    name = f"sse_test_{secrets.token_hex(4)}"
    listener, recorder = start(config_for(name, tmp_path))
    await wait_for(
        lambda: any("does not exist" in line for line in warnings_logged(log_events)),
        "a failed first attempt",
    )
    assert not listener.listening
    sql("postgres", f'CREATE DATABASE "{name}"')
    try:
        sql(name, SCHEMA.read_text())
        await listening(listener)  # the retries back off: about 1, 2, 4 s
        userid, _ = new_user(name)
        sql(name, "DELETE FROM users WHERE uuid = %s", (userid,))
        assert await recorder.next_revoked() == userid
        await listener.stopService()
    finally:
        sql("postgres", f'DROP DATABASE "{name}" WITH (FORCE)')
    assert tracebacks(log_events) == []


@pytest_twisted.ensureDeferred
async def test_stopping_closes_the_connection_for_good(
    start: Starter, database: str, tmp_path: Path
) -> None:
    listener, _ = start(config_for(database, tmp_path))
    await listening(listener)
    await listener.stopService()
    assert not listener.listening
    await wait_for(lambda: listener_backends(database) == [], "the server to see it closed")


# --- the grant query, on the listener's connection to the primary ---


@pytest_twisted.ensureDeferred
async def test_granted_tells_which_of_many_pairs_are_still_in_users(
    start: Starter, database: str, tmp_path: Path
) -> None:
    listener, _ = start(config_for(database, tmp_path))
    await listening(listener)
    alice, bob = new_user(database), new_user(database)
    crossed = (alice[0], bob[1])
    strangers = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(300)]
    granted = await bounded(listener.granted([alice, crossed, *strangers, bob]), WAIT_SECONDS)
    assert granted == {alice, bob}
    injected = (alice[0], "' OR '1'='1")
    assert await bounded(listener.granted([injected]), WAIT_SECONDS) == set()


@pytest_twisted.ensureDeferred
async def test_granted_without_a_users_table_is_unavailable_and_quotes_no_token(
    start: Starter, tmp_path: Path
) -> None:
    name = f"sse_test_{secrets.token_hex(4)}"
    sql("postgres", f'CREATE DATABASE "{name}"')
    try:
        listener, _ = start(config_for(name, tmp_path))
        await listening(listener)
        token = new_token()
        with pytest.raises(BackendUnavailable) as raised:
            await bounded(listener.granted([(new_uuid(), token)]), WAIT_SECONDS)
        assert str(raised.value) == 'relation "users" does not exist'
        await listener.stopService()
    finally:
        sql("postgres", f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest_twisted.ensureDeferred
async def test_granted_without_a_connection_to_the_primary_is_unavailable(
    start: Starter, own_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    allow_connections(own_database, False)
    try:
        listener, _ = start(config_for(own_database, tmp_path))
        await wait_for(
            lambda: bool(lines_with(log_events, "cannot connect to PostgreSQL")),
            "a refused connection",
        )
        with pytest.raises(BackendUnavailable) as raised:
            await bounded(listener.granted([(new_uuid(), new_token())]), WAIT_SECONDS)
        assert str(raised.value) == ("no live connection to the PostgreSQL primary (reconnecting)")
    finally:
        allow_connections(own_database, True)


def lock_waiters(database: str) -> int:
    with closing(connect(database)) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
            (database,),
        )
        (count,) = cursor.fetchone()
        return int(count)


@pytest_twisted.ensureDeferred
async def test_grant_queries_take_turns_on_the_listening_connection_and_lose_no_notification(
    start: Starter, own_database: str, tmp_path: Path, log_events: Sequence[LogEvent]
) -> None:
    listener, recorder = start(config_for(own_database, tmp_path, timeout_seconds="10"))
    await listening(listener)
    alice, bob = new_user(own_database), new_user(own_database)
    revoked = str(uuid.uuid4())
    with closing(connect(own_database)) as locker:
        locker.autocommit = False
        locker.cursor().execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        # Two at once on one connection: psycopg2 refuses a second query while one runs,
        # so the second must wait for its turn.
        first = listener.granted([alice])
        second = listener.granted([bob, (bob[0], alice[1])])
        await wait_for(lambda: lock_waiters(own_database) == 1, "the first query to wait")
        # Sent while the query waits on the lock: delivered once it is over.
        sql(own_database, "SELECT pg_notify(%s, %s)", (CHANNEL, revoked))
        assert not first.called and not second.called
        locker.rollback()
    assert await bounded(first, WAIT_SECONDS) == {alice}
    assert await bounded(second, WAIT_SECONDS) == {bob}
    assert await recorder.next_revoked() == revoked
    assert listener.listening
    assert tracebacks(log_events) == []


# --- end to end: a live stream over TLS, closed by a revocation ---


def revocation_listener(server: RunningServer) -> RevocationListener:
    """The running server's revocation feed, found by its service name."""
    revocations = server.service.getServiceNamed("revocations")
    assert isinstance(revocations, RevocationListener)
    return revocations


@pytest_twisted.async_yield_fixture
async def server(tls_environ: dict[str, str]) -> AsyncIterator[RunningServer]:
    running = await start_server(tls_environ)
    revocations = revocation_listener(running)
    await wait_for(lambda: revocations.listening, "the server to LISTEN for revocations")
    yield running
    await running.stop()


REVOCATION_SECONDS = 5.0


@pytest_twisted.ensureDeferred
async def test_deleting_a_user_closes_its_open_streams_and_it_is_refused_after(
    server: RunningServer,
    browser: Browser,
    postgres_tls: PostgresServer,
    log_events: Sequence[LogEvent],
) -> None:
    alice, alice_token = add_subscriber(postgres_tls)
    bob, bob_token = add_subscriber(postgres_tls)
    url = server.subscribe_url(new_uuid(), alice, alice_token)
    _, first_tab = await browser.open(url)
    _, second_tab = await browser.open(server.subscribe_url(new_uuid(), alice, alice_token))
    _, bobs_tab = await browser.open(server.subscribe_url(new_uuid(), bob, bob_token))
    await wait_for(lambda: len(server.service.registry) == 3, "three streams registered")
    # Alice's second tab was let in from the cache...
    assert server.service.metrics.registry.get_sample_value("sse_auth_cache_hits_total") == 1

    postgres_tls.execute("DELETE FROM users WHERE uuid = %s", (alice,))

    for tab in (first_tab, second_tab):
        await bounded(tab.closed, REVOCATION_SECONDS)
    assert list(server.service.registry.streams_of(alice)) == []
    assert not bobs_tab.closed.called
    # ...and forgotten: the browser coming back is refused, so EventSource stops.
    response = await browser.get(url)
    assert response.code == 403
    assert (await browser.read_body(response)) == b"unknown subscriber\n"
    revoked = lines_with(log_events, "access revoked")
    assert revoked == [f"access revoked for {alice}: 2 open streams closed"]
    text = log_text(log_events)
    assert alice_token not in text


@pytest_twisted.ensureDeferred
async def test_a_new_token_closes_the_stream_and_only_the_new_token_gets_back_in(
    server: RunningServer, browser: Browser, postgres_tls: PostgresServer
) -> None:
    userid, old_token = add_subscriber(postgres_tls)
    topic = new_uuid()
    _, tab = await browser.open(server.subscribe_url(topic, userid, old_token))
    await wait_for(lambda: len(server.service.registry) == 1, "stream registered")

    replacement = new_token()
    postgres_tls.execute("UPDATE users SET sse_token = %s WHERE uuid = %s", (replacement, userid))

    await bounded(tab.closed, REVOCATION_SECONDS)
    refused = await browser.get(server.subscribe_url(topic, userid, old_token))
    assert refused.code == 403
    await browser.read_body(refused)
    response, resumed = await browser.open(server.subscribe_url(topic, userid, replacement))
    assert response.code == 200
    await wait_for(lambda: "connected" in resumed.parser.comments, "the new stream to open")


# --- nothing closed on a notification's word alone; nothing missed while LISTEN was down ---
# A server in this process on the test RabbitMQ and the machine's PostgreSQL, with a database
# of its own: these tests truncate it and shut it to new connections.


@pytest.fixture
def own_database() -> Iterator[str]:
    name = f"sse_test_{secrets.token_hex(6)}"
    sql("postgres", f'CREATE DATABASE "{name}"')
    try:
        sql(name, SCHEMA.read_text())
        yield name
    finally:
        sql("postgres", f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest_twisted.async_yield_fixture
async def own_server(
    tls_environ: dict[str, str], local_database: dict[str, str], own_database: str
) -> AsyncIterator[RunningServer]:
    # The machine's PostgreSQL is plaintext, which prod refuses without the opt-out.
    running = await start_server(
        {
            **tls_environ,
            **local_database,
            "SSE_POSTGRES_DB_NAME": own_database,
            "SSE_ALLOW_INSECURE_BACKENDS": "true",
        }
    )
    revocations = revocation_listener(running)
    await wait_for(lambda: revocations.listening, "the server to LISTEN for revocations")
    yield running
    await running.stop()


async def open_tab(server: RunningServer, browser: Browser, userid: str, token: str) -> Any:
    """A stream of ``userid``, once the server has it open."""
    _, tab = await browser.open(server.subscribe_url(new_uuid(), userid, token))
    await wait_for(lambda: "connected" in tab.parser.comments, "the stream to open")
    return tab


@pytest_twisted.ensureDeferred
async def test_a_forged_notification_closes_nothing_while_a_real_delete_still_closes(
    own_server: RunningServer,
    own_database: str,
    browser: Browser,
    rabbitmq_tls: RabbitMQServer,
    log_events: Sequence[LogEvent],
) -> None:
    alice, alice_token = add_local_subscriber(own_database)
    bob, bob_token = add_local_subscriber(own_database)
    alices_tab = await open_tab(own_server, browser, alice, alice_token)
    bobs_tab = await open_tab(own_server, browser, bob, bob_token)

    # Any role may NOTIFY the channel: Alice's row is still there.
    sql(own_database, "SELECT pg_notify(%s, %s)", (CHANNEL, alice))
    sql(own_database, "DELETE FROM users WHERE uuid = %s", (bob,))

    # Notifications are handled in order: once Bob's stream is closed, Alice's notice was
    # checked too.
    await bounded(bobs_tab.closed, REVOCATION_SECONDS)
    assert not alices_tab.closed.called
    assert lines_with(log_events, "revocation notice for") == [
        f"revocation notice for {alice}: the database still grants its 1 open streams here,"
        " none closed"
    ]
    assert lines_with(log_events, "access revoked") == [
        f"access revoked for {bob}: 1 open streams closed"
    ]
    # Alice's stream still works.
    queue = own_server.config.rabbitmq_queue_name
    await publish(rabbitmq_tls.amqp_port, queue, found_contract(alice))
    event = await alices_tab.next_event()
    assert json.loads(event["data"])["userid"] == alice
    text = log_text(log_events)
    assert alice_token not in text and bob_token not in text


@pytest_twisted.ensureDeferred
async def test_truncating_users_closes_every_open_stream(
    own_server: RunningServer, own_database: str, browser: Browser, log_events: Sequence[LogEvent]
) -> None:
    tabs = []
    for _ in range(3):
        userid, token = add_local_subscriber(own_database)
        tabs.append(await open_tab(own_server, browser, userid, token))

    sql(own_database, "TRUNCATE users")

    for tab in tabs:
        await bounded(tab.closed, REVOCATION_SECONDS)
    assert len(own_server.service.registry) == 0
    assert lines_with(log_events, "re-checked") == [
        "re-checked 3 open streams against PostgreSQL: 3 closed"
    ]


def allow_connections(database: str, allowed: bool) -> None:
    sql("postgres", f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')


@pytest_twisted.ensureDeferred
async def test_a_revocation_missed_while_listen_was_down_is_enforced_after_it_reconnects(
    own_server: RunningServer, own_database: str, browser: Browser, log_events: Sequence[LogEvent]
) -> None:
    alice, alice_token = add_local_subscriber(own_database)
    bob, bob_token = add_local_subscriber(own_database)
    alices_tab = await open_tab(own_server, browser, alice, alice_token)
    bobs_tab = await open_tab(own_server, browser, bob, bob_token)
    revocations = revocation_listener(own_server)
    [backend] = listener_backends(own_database)

    # The miss made certain: the LISTEN connection is killed and cannot come back (the
    # server's pool stays connected) until Alice's row is deleted.
    with closing(connect(own_database)) as held:
        allow_connections(own_database, False)
        try:
            held.cursor().execute("SELECT pg_terminate_backend(%s)", (backend,))
            await wait_for(
                lambda: bool(lines_with(log_events, "cannot connect to PostgreSQL")),
                "a refused reconnection",
            )
            assert not revocations.listening
            held.cursor().execute("DELETE FROM users WHERE uuid = %s", (alice,))
        finally:
            allow_connections(own_database, True)

    await bounded(alices_tab.closed, WAIT_SECONDS)
    assert not bobs_tab.closed.called
    assert lines_with(log_events, "access revoked") == [
        f"access revoked for {alice}: 1 open streams closed"
    ]
    response = await browser.get(own_server.subscribe_url(new_uuid(), alice, alice_token))
    assert response.code == 403
    await browser.read_body(response)


# --- the enforcer, unit level: outages, floods and batches on a Clock ---


class ScriptedGrants:
    """The database's answers to grant queries, given by the test one query at a time."""

    def __init__(self) -> None:
        self.asked: list[tuple[list[tuple[str, str]], Deferred[set[tuple[str, str]]]]] = []

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> Deferred[set[tuple[str, str]]]:
        answer: Deferred[set[tuple[str, str]]] = Deferred()
        self.asked.append((list(pairs), answer))
        return answer

    def answer(self, granted: set[tuple[str, str]] | Exception) -> None:
        """Answer the latest query."""
        _, pending = self.asked[-1]
        if isinstance(granted, Exception):
            pending.errback(granted)
        else:
            pending.callback(granted)


def _ended(_: object, stream: EventStream, registry: StreamRegistry) -> None:
    # As the resource does: a finished request ends the stream and leaves the registry.
    stream.response_ended()
    registry.remove(stream)


def enforcer_with_streams(
    pairs: list[tuple[str, str]], batch_pairs: int = 500
) -> tuple[RevocationEnforcer, ScriptedGrants, Clock, list[EventStream]]:
    clock, registry, grants = Clock(), StreamRegistry(), ScriptedGrants()
    cache = CachingAuthenticator(ImmediateAuthenticator(), clock, 10, 100)
    enforcer = RevocationEnforcer(cache, registry, grants, clock, batch_pairs=batch_pairs)
    enforcer.startService()
    streams = []
    for userid, nonce in pairs:
        request = DummyRequest([b""])
        stream = EventStream(userid, new_uuid(), request, "c", 1000, nonce=nonce)
        registry.add(stream)
        request.notifyFinish().addBoth(_ended, stream, registry)
        streams.append(stream)
    return enforcer, grants, clock, streams


def test_a_database_outage_keeps_the_streams_open_and_the_check_is_retried_later(
    log_events: Sequence[LogEvent],
) -> None:
    alice = (new_uuid(), new_token())
    enforcer, grants, clock, [stream] = enforcer_with_streams([alice])
    enforcer.revoke(alice[0])
    grants.answer(BackendUnavailable("no live connection to PostgreSQL (reconnecting)"))
    assert not stream.request.finished and len(grants.asked) == 1
    assert any("they stay open; retrying in 1.0 s" in line for line in warnings_logged(log_events))
    clock.advance(1)
    assert len(grants.asked) == 2  # asked again
    grants.answer(set())
    assert stream.request.finished and enforcer.idle


def test_a_flood_of_notifications_for_one_user_costs_one_more_query() -> None:
    alice = (new_uuid(), new_token())
    enforcer, grants, _, [stream] = enforcer_with_streams([alice])
    for _ in range(1000):
        enforcer.revoke(alice[0])
    enforcer.revoke(new_uuid())  # a user with no stream here costs no query
    assert enforcer.queries == 1
    grants.answer({alice})
    # Notifications that came while it was out may postdate its answer: one more check.
    assert enforcer.queries == 2
    grants.answer({alice})
    assert enforcer.queries == 2 and enforcer.idle and not stream.request.finished


def test_every_stream_is_checked_in_batches_and_only_the_ungranted_are_closed() -> None:
    pairs = [(new_uuid(), new_token()) for _ in range(5)]
    enforcer, grants, _, streams = enforcer_with_streams(pairs, batch_pairs=2)
    enforcer.resynchronise()
    for _ in range(3):
        batch = grants.asked[-1][0]
        grants.answer({pair for pair in batch if pair != pairs[3]})
    assert [len(batch) for batch, _ in grants.asked] == [2, 2, 1]
    assert [stream.request.finished for stream in streams] == [0, 0, 0, 1, 0]


def test_an_outage_in_the_middle_of_a_round_keeps_what_was_closed_and_retries_the_rest(
    log_events: Sequence[LogEvent],
) -> None:
    alice, bob = (new_uuid(), new_token()), (new_uuid(), new_token())
    enforcer, grants, clock, [alices, bobs] = enforcer_with_streams([alice, bob], batch_pairs=1)
    enforcer.resynchronise()
    grants.answer(set())  # Alice's pair is gone
    grants.answer(BackendUnavailable("no answer within 2.0 seconds"))
    assert alices.request.finished and not bobs.request.finished
    assert lines_with(log_events, "access revoked") == [
        f"access revoked for {alice[0]}: 1 open streams closed"
    ]
    clock.advance(1)
    assert grants.asked[-1][0] == [bob]  # only what is still open
    grants.answer({bob})
    assert enforcer.idle and not bobs.request.finished
