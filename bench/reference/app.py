"""The reference server: the smallest asyncio implementation of sse-twisted's contract.

What a user might write instead of sse-twisted, on uvicorn + sse-starlette + aio-pika +
asyncpg, kept as plain as their documentation shows; ``bench/`` measures it beside
sse-twisted in the same run (issue 11). The contract is sse-twisted's: ``GET
/subscribe/<topic>/<userid>/<nonce>`` with three lowercase v4 UUIDs (else ``400``), the pair
checked in ``users`` (else ``403``), then an event stream that opens with ``: connected``
and gets ``id: <stream offset>`` / ``data: <message>`` for every message of the stream queue
whose ``userid`` is the subscriber's, and a keep-alive comment every
``SSE_HEARTBEAT_SECONDS``. Left out, as a first version would: replay, limits, revocation,
metrics, HTTP/2 (uvicorn has none). It reads sse-twisted's ``SSE_*`` variables::

    uvicorn bench.reference.app:app --ssl-keyfile key.pem --ssl-certfile cert.pem
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

V4_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
SUBSCRIBER_QUERY = "SELECT 1 FROM users WHERE uuid = $1 AND sse_token = $2"
HEARTBEAT_SECONDS = float(os.environ.get("SSE_HEARTBEAT_SECONDS", "15"))

# The open streams of each user: one queue of events per stream.
streams: dict[str, set[asyncio.Queue[ServerSentEvent]]] = defaultdict(set)


async def on_message(message: AbstractIncomingMessage) -> None:
    """Send a message of the stream queue to every open stream of its ``userid``."""
    async with message.process():
        try:
            document = json.loads(message.body)
            userid = document["userid"]
        except (ValueError, KeyError, TypeError):
            return  # not one of ours: skipped, acknowledged
        offset = message.headers["x-stream-offset"]
        event = ServerSentEvent(data=message.body.decode(), id=str(offset), sep="\n")
        for queue in streams.get(userid, ()):
            queue.put_nowait(event)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    """The database pool and the stream queue's consumer, for as long as the server runs."""
    pool_size = int(os.environ.get("SSE_POSTGRES_POOL_SIZE", "4"))
    async with asyncpg.create_pool(
        host=os.environ.get("SSE_POSTGRES_HOST", "127.0.0.1"),
        port=int(os.environ.get("SSE_POSTGRES_PORT", "5432")),
        user=os.environ.get("SSE_POSTGRES_USERNAME", "postgres"),
        password=os.environ.get("SSE_POSTGRES_PASSWORD"),
        database=os.environ["SSE_POSTGRES_DB_NAME"],
        min_size=pool_size,
        max_size=pool_size,
    ) as pool:
        connection = await aio_pika.connect_robust(
            host=os.environ.get("SSE_RABBITMQ_HOST", "127.0.0.1"),
            port=int(os.environ.get("SSE_RABBITMQ_PORT", "5672")),
            login=os.environ.get("SSE_RABBITMQ_USERNAME", "guest"),
            password=os.environ.get("SSE_RABBITMQ_PASSWORD", "guest"),
        )
        async with connection:
            channel = await connection.channel()
            # A stream queue refuses consumers without a prefetch limit.
            await channel.set_qos(
                prefetch_count=int(os.environ.get("SSE_RABBITMQ_PREFETCH", "1000"))
            )
            queue = await channel.declare_queue(
                os.environ["SSE_RABBITMQ_QUEUE_NAME"],
                durable=True,
                arguments={"x-queue-type": "stream", "x-max-age": "1D"},
            )
            await queue.consume(on_message, arguments={"x-stream-offset": "next"})
            yield {"pool": pool}


async def subscribe(request: Request) -> Response:
    """Check the subscriber, then hold the response open as its event stream."""
    parts = request.path_params
    for name in ("topic", "userid", "nonce"):
        if not V4_UUID.fullmatch(parts[name]):
            return PlainTextResponse(f"{name} is not a lowercase v4 UUID\n", status_code=400)
    userid = parts["userid"]
    if await request.state.pool.fetchval(SUBSCRIBER_QUERY, userid, parts["nonce"]) is None:
        return PlainTextResponse("unknown subscriber\n", status_code=403)

    async def events() -> AsyncIterator[ServerSentEvent]:
        queue: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
        streams[userid].add(queue)
        try:
            yield ServerSentEvent(comment="connected", sep="\n")
            while True:
                yield await queue.get()
        finally:
            streams[userid].discard(queue)
            if not streams[userid]:
                del streams[userid]

    return EventSourceResponse(events(), ping=HEARTBEAT_SECONDS, sep="\n")


app = Starlette(
    routes=[Route("/subscribe/{topic}/{userid}/{nonce}", subscribe)],
    lifespan=lifespan,
)
