"""Memory the replay window holds per retained event, for a typical ``foundcontract``.

.venv/bin/python -m bench.replay_memory [EVENTS]
"""

from __future__ import annotations

import argparse
import json
import tracemalloc
import uuid

from twisted.internet.task import Clock

from sse_twisted._framing import event_frame
from sse_twisted._messages import parse_message
from sse_twisted._replay import ReplayWindow


def main(events: int) -> None:
    """Fill a window with ``events`` events of 1,000 users; print bytes per event, and
    what the window counts towards its byte bound (the frames only)."""
    users = [str(uuid.uuid4()) for _ in range(1000)]
    messages = [
        parse_message(
            json.dumps(
                {
                    "userid": users[number % len(users)],
                    "filename": "report.pdf",
                    "filepath": "/x/report.pdf",
                    "finished": False,
                    "type": "foundcontract",
                }
            ).encode()
        )
        for number in range(events)
    ]
    window = ReplayWindow(Clock(), max_age_seconds=300, max_events=events, max_bytes=2**62)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for offset, message in enumerate(messages):
        window.record(message.userid, message.topic, offset, event_frame(message.data, offset))
    total = tracemalloc.get_traced_memory()[0] - before
    print(
        json.dumps(
            {
                "events": events,
                "bytes_per_event": round(total / events),
                "frame_bytes": len(event_frame(messages[0].data, 0)),
                "window_bytes": window.bytes,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.replay_memory", description=__doc__)
    parser.add_argument("events", type=int, nargs="?", default=100_000)
    main(parser.parse_args().events)
