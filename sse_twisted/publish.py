"""Publish one message to the ``messages`` queue, as a publisher or the management UI would.

    python -m sse_twisted.publish --userid <uuid> [--topic <uuid>] [--filename report.pdf]

With ``--partitions P`` (default: ``SSE_RABBITMQ_PARTITIONS``, else 1) above 1, it goes to
the super stream's exchange ``messages``, with the user's partition as routing key.

A development tool: it blocks, so it never runs inside the server.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
from pathlib import Path

import pika
import pika.exceptions

from ._partitions import partition_of
from ._tls import RABBITMQ_CA_FILE, RABBITMQ_CLIENT_CERT_FILE, RABBITMQ_CLIENT_KEY_FILE


def _partition_count(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sse_twisted.publish", description=__doc__)
    parser.add_argument("--userid", required=True, help="the user whose streams receive it")
    parser.add_argument("--topic", help="only the user's streams on this topic")
    parser.add_argument("--type", default="foundcontract", help="message type")
    parser.add_argument("--filename", default="report.pdf")
    parser.add_argument("--finished", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="default 5671 with --tls, else 5672")
    parser.add_argument("--username", default="guest")
    parser.add_argument("--password", default="guest")
    parser.add_argument("--vhost", default="/")
    parser.add_argument("--queue", default="messages", help="the stream (or super stream)")
    parser.add_argument(
        "--partitions",
        type=_partition_count,
        default=os.environ.get("SSE_RABBITMQ_PARTITIONS", "1"),
        help="partitions of the stream: above 1, published to its exchange, routed by user",
    )
    parser.add_argument("--tls", action="store_true", help="amqps with the certs dir identity")
    parser.add_argument("--certs-dir", type=Path, default=Path("certs"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Publish the message described by the arguments; return the exit status."""
    options = _arguments(sys.argv[1:] if argv is None else argv)
    message = {
        "userid": options.userid,
        "filename": options.filename,
        "filepath": f"/contracts/{options.filename}",
        "finished": options.finished,
        "type": options.type,
    }
    if options.topic:
        message["topic"] = options.topic
    ssl_options = None
    if options.tls:
        context = ssl.create_default_context(cafile=str(options.certs_dir / RABBITMQ_CA_FILE))
        context.load_cert_chain(
            options.certs_dir / RABBITMQ_CLIENT_CERT_FILE,
            options.certs_dir / RABBITMQ_CLIENT_KEY_FILE,
        )
        ssl_options = pika.SSLOptions(context, options.host)
    parameters = pika.ConnectionParameters(
        host=options.host,
        port=options.port or (5671 if options.tls else 5672),
        virtual_host=options.vhost,
        credentials=pika.PlainCredentials(options.username, options.password),
        ssl_options=ssl_options,
    )
    body = json.dumps(message, indent=2).encode("utf-8")
    # Unpartitioned: the default exchange routes by queue name. Partitioned: the super
    # stream's exchange routes by partition number.
    exchange, routing_key, where = "", options.queue, f"queue {options.queue!r}"
    if options.partitions > 1:
        partition = partition_of(options.userid, options.partitions)
        exchange, routing_key = options.queue, str(partition)
        where = f"partition {partition} of super stream {options.queue!r}"
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key, body, mandatory=True)
    except pika.exceptions.UnroutableError:
        print(f"{where} does not exist yet: start the server first", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as error:
        print(
            f"{where} does not exist yet ({error.reply_text}): start the server first",
            file=sys.stderr,
        )
        return 1
    finally:
        if connection.is_open:
            connection.close()
    print(f"published to {where}: {json.dumps(message)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
