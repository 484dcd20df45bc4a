"""Revocation before/after: what happens to open streams in the four cases of issue 10, item 8.

.venv/bin/python -m bench.revocation [STREAMS]

A server in this process on the machine's PostgreSQL (a scratch database) and RabbitMQ
(plaintext), ``STREAMS`` browsers (default 50), each a user of its own. Prints one JSON
object per case:

* ``forged``: every user's uuid NOTIFYd by hand while all rows stay: streams closed;
* ``truncate``: ``TRUNCATE users``: streams closed, and how long it took;
* ``missed``: the LISTEN backend killed, every row deleted while it cannot reconnect: streams
  closed within 10 s of reconnections being allowed again;
* ``lifetime``: streams under ``SSE_MAX_STREAM_SECONDS=2`` while every user gets an event
  about every 0.1 s for 6 s, each browser reconnecting as EventSource does (after the
  ``retry:`` delay, with its last event id): when the first expiries came (seconds after
  the last stream opened), how many, their ``retry:``, and events lost or duplicated.

For the code before, run this file from an export of the old tree (the schema is read next
to the imported package)::

    git archive <old commit> | tar -x -C /tmp/before && cp bench/revocation.py /tmp/before/bench/
    (cd /tmp/before && /path/to/.venv/bin/python -m bench.revocation)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pika
import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater, react
from twisted.internet.threads import deferToThread

import sse_twisted
from sse_twisted._revocation import RevocationListener
from tests.backends import Pki
from tests.browser import Browser, EventCollector
from tests.in_process_server import start_server
from tests.publishing import found_contract, publish

SCHEMA = Path(sse_twisted.__file__).parent.parent / "schema" / "users.sql"
LIFETIME_SECONDS = 2.0


def run_sql(database: str, statement: str, parameters: tuple[Any, ...] = ()) -> None:
    with closing(psycopg2.connect(host="127.0.0.1", user="postgres", dbname=database)) as db:
        db.autocommit = True
        with db.cursor() as cursor:
            cursor.execute(statement, parameters)


def listen_backends(database: str) -> list[int]:
    with (
        closing(psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")) as db,
        db.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN %%'",
            (database,),
        )
        return [pid for (pid,) in cursor.fetchall()]


def delete_queue(name: str) -> None:
    with closing(pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1"))) as broker:
        broker.channel().queue_delete(name)


async def until(condition: Callable[[], bool], seconds: float) -> float | None:
    """Seconds until ``condition`` held, or None if it did not within ``seconds``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > seconds:
            return None
        await deferLater(reactor, 0.01, lambda: None)
    return round(time.monotonic() - start, 3)


class Case:
    """A fresh database and server, and ``count`` users each with one open stream."""

    def __init__(self, pki: Pki, count: int, **settings: str) -> None:
        self.pki, self.count, self.settings = pki, count, settings
        self.database = f"sse_bench_{uuid.uuid4().hex[:12]}"
        self.queue = f"bench-{uuid.uuid4()}"
        self.users: list[tuple[str, str]] = []
        self.tabs: list[EventCollector] = []

    async def __aenter__(self) -> Case:
        run_sql("postgres", f'CREATE DATABASE "{self.database}"')
        run_sql(self.database, SCHEMA.read_text())
        self.users = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(self.count)]
        for pair in self.users:
            run_sql(self.database, "INSERT INTO users VALUES (%s, %s)", pair)
        self.server = await start_server(
            {
                "SSE_CERTS_DIR": str(self.pki.directory),
                "SSE_LOGS_DIR": str(self.pki.directory / "logs"),
                "SSE_POSTGRES_HOST": "127.0.0.1",
                "SSE_POSTGRES_USERNAME": "postgres",
                "SSE_POSTGRES_DB_NAME": self.database,
                "SSE_POSTGRES_SSLMODE": "disable",
                "SSE_POSTGRES_TIMEOUT_SECONDS": "2",
                "SSE_RABBITMQ_TLS": "false",
                "SSE_ALLOW_INSECURE_BACKENDS": "true",
                "SSE_RABBITMQ_HOST": "127.0.0.1",
                "SSE_RABBITMQ_QUEUE_NAME": self.queue,
                "SSE_RETRY_MILLISECONDS": "300",
                "SSE_RECONNECT_JITTER_MILLISECONDS": "400",
                **self.settings,
            }
        )
        revocations = self.server.service.getServiceNamed("revocations")
        assert isinstance(revocations, RevocationListener)
        await until(lambda: revocations.listening, 10)
        self.browser = Browser(self.pki.ca_certificate)
        for userid, token in self.users:
            url = self.server.subscribe_url(str(uuid.uuid4()), userid, token)
            self.tabs.append((await self.browser.open(url))[1])
        await until(lambda: len(self.server.service.registry) == self.count, 10)
        return self

    def closed(self) -> int:
        return sum(tab.closed.called for tab in self.tabs)

    async def __aexit__(self, *_: object) -> None:
        await self.browser.close_all()
        await self.server.stop()
        run_sql("postgres", f'DROP DATABASE "{self.database}" WITH (FORCE)')
        # A stream queue keeps files open in the broker: leave none behind.
        await deferToThread(delete_queue, self.queue)


async def forged(pki: Pki, count: int) -> dict[str, Any]:
    async with Case(pki, count + 1) as case:
        *users, (sentinel, _) = case.users
        for userid, _ in users:
            run_sql(case.database, "SELECT pg_notify('sse_revocations', %s)", (userid,))
        # Handled after the forged ones: once its stream is closed, they were handled too.
        run_sql(case.database, "DELETE FROM users WHERE uuid = %s", (sentinel,))
        await until(lambda: case.tabs[-1].closed.called, 10)
        return {"case": "forged", "streams": count, "closed": case.closed() - 1}


async def truncate(pki: Pki, count: int) -> dict[str, Any]:
    async with Case(pki, count) as case:
        run_sql(case.database, "TRUNCATE users")
        seconds = await until(lambda: case.closed() == count, 5)
        return {"case": "truncate", "streams": count, "closed": case.closed(), "seconds": seconds}


async def missed(pki: Pki, count: int) -> dict[str, Any]:
    async with Case(pki, count) as case:
        [backend] = listen_backends(case.database)
        allow = 'ALTER DATABASE "{}" ALLOW_CONNECTIONS {}'
        with closing(
            psycopg2.connect(host="127.0.0.1", user="postgres", dbname=case.database)
        ) as held:
            held.autocommit = True
            run_sql("postgres", allow.format(case.database, "false"))
            held.cursor().execute("SELECT pg_terminate_backend(%s)", (backend,))
            held.cursor().execute("DELETE FROM users")
            # The listener tries again at once, then after about 1 s: both refused.
            await deferLater(reactor, 1.5, lambda: None)
            run_sql("postgres", allow.format(case.database, "true"))
        seconds = await until(lambda: case.closed() == count, 10)
        return {"case": "missed", "streams": count, "closed": case.closed(), "seconds": seconds}


async def lifetime(pki: Pki, count: int) -> dict[str, Any]:
    async with Case(pki, count, SSE_MAX_STREAM_SECONDS=str(LIFETIME_SECONDS)) as case:
        opened = time.monotonic()  # the last stream just opened
        closed_after: dict[int, float] = {}
        for index, tab in enumerate(case.tabs):
            tab.closed.addCallback(
                lambda _, index=index: closed_after.setdefault(index, time.monotonic() - opened)
            )
        # Events for every user, one a moment, from before the expiry to after the resume.
        sequence = 0

        async def publisher(until_time: float) -> None:
            nonlocal sequence
            while time.monotonic() < until_time:
                await publish(
                    5672,
                    case.queue,
                    *(found_contract(userid, seq=sequence) for userid, _ in case.users),
                )
                sequence += 1

        publishing = Deferred.fromCoroutine(publisher(opened + 3 * LIFETIME_SECONDS))
        sessions = [[tab] for tab in case.tabs]
        stopping = False

        async def browse(index: int) -> None:
            # As EventSource does: after each close, wait the retry delay, then reconnect
            # with the last event id seen.
            userid, token = case.users[index]
            last_id = ""
            while True:
                tab = sessions[index][-1]
                await tab.closed
                last_id = tab.parser.last_event_id or last_id
                if stopping:
                    return
                await deferLater(reactor, (tab.parser.retry or 0) / 1000, lambda: None)
                url = case.server.subscribe_url(str(uuid.uuid4()), userid, token)
                sessions[index].append((await case.browser.open(url, last_event_id=last_id))[1])

        browsing = [Deferred.fromCoroutine(browse(index)) for index in range(count)]
        await publishing
        await until(
            lambda: all(sum(len(tab.received) for tab in tabs) >= sequence for tabs in sessions),
            10,
        )
        stopping = True
        await case.browser.close_all()
        await DeferredList(browsing)
        lost = duplicated = 0
        for tabs in sessions:
            got = [json.loads(event["data"])["seq"] for tab in tabs for event in tab.received]
            lost += len(set(range(sequence)) - set(got))
            duplicated += len(got) - len(set(got))
        retries = [tab.parser.retry or 0 for tabs in sessions for tab in tabs[:-1]]
        # A first stream closed only by the browser at the end did not expire.
        times = sorted(closed_after[index] for index, tabs in enumerate(sessions) if tabs[1:])
        return {
            "case": "lifetime",
            "streams": count,
            "first_expiry_seconds": [round(times[0], 2), round(times[-1], 2)] if times else None,
            "expiries": len(retries),
            "retry_ms": [min(retries), statistics.median(retries), max(retries)]
            if retries
            else None,
            "events_each": sequence,
            "lost": lost,
            "duplicated": duplicated,
        }


async def main(_: Any, count: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        pki = Pki.create(Path(directory))
        for case in (forged, truncate, missed, lifetime):
            result = await case(pki, count)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.revocation", description=__doc__)
    parser.add_argument("streams", type=int, nargs="?", default=50)
    react(
        lambda reactor, count: Deferred.fromCoroutine(main(reactor, count)),
        (parser.parse_args().streams,),
    )
