"""``python -m bench.reuseport``: what clients see when a listener hands over by SO_REUSEPORT.

A second plain socket binds the port beside the first (SO_REUSEPORT), the first stops
accepting and closes; clients connect in a loop meanwhile. The kernel spreads new connections
over both listeners, and those queued on the one that closes are reset (unless
``net.ipv4.tcp_migrate_req`` is 1). The README's "Deploying" section gives the figures: this
is why the server's handover is systemd's socket, not SO_REUSEPORT.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from pathlib import Path

HANDOVERS = 20
CLIENTS = 4


def _listener(port: int) -> socket.socket:
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listening.bind(("127.0.0.1", port))
    listening.listen(4096)
    listening.settimeout(0.01)
    return listening


def _serve(listening: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            connection, _ = listening.accept()
        except OSError:  # the accept timeout among them
            continue
        with connection:
            connection.recv(100)
            connection.sendall(b"ok")


def _connect(port: int, stop: threading.Event, outcomes: Counter[str]) -> None:
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                connection.sendall(b"hi")
                outcomes["ok" if connection.recv(10) == b"ok" else "unanswered"] += 1
        except ConnectionRefusedError:
            outcomes["refused"] += 1
        except ConnectionResetError:
            outcomes["reset"] += 1


def main() -> None:
    """Run the handovers and print what the clients saw."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    outcomes: Counter[str] = Counter()
    current, stop_current = _listener(port), threading.Event()
    threading.Thread(target=_serve, args=(current, stop_current), daemon=True).start()
    stop_clients = threading.Event()
    for _ in range(CLIENTS):
        threading.Thread(target=_connect, args=(port, stop_clients, outcomes), daemon=True).start()
    for _ in range(HANDOVERS):
        time.sleep(0.2)
        following, stop_following = _listener(port), threading.Event()
        threading.Thread(target=_serve, args=(following, stop_following), daemon=True).start()
        time.sleep(0.2)
        stop_current.set()  # the old process's drain: it stops accepting, then closes
        time.sleep(0.05)
        current.close()
        current, stop_current = following, stop_following
    time.sleep(0.2)
    stop_clients.set()
    time.sleep(0.3)
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
    print(f"{HANDOVERS} handovers, tcp_migrate_req={migrate}: {dict(outcomes)}")


if __name__ == "__main__":
    main()
