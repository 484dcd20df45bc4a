"""``twistd -n sse-server`` run as a child process, as an operator runs it: its output read
as JSON lines, and instances that serve on their own ports side by side."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from tests.secrets_tracking import LOGGED_TEXT
from tests.waiting import bounded

TWISTD = Path(sys.executable).parent / "twistd"


class TwistdProcess(ProcessProtocol):
    """A running twistd whose stdout is read as JSON lines."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw = b""
        self.stderr = b""
        self.port: Deferred[int] = Deferred()
        self.consuming: Deferred[None] = Deferred()
        self.ended: Deferred[tuple[int | None, int | None]] = Deferred()
        self._partial = b""

    def outReceived(self, data: bytes) -> None:
        self.raw += data
        LOGGED_TEXT.append(data.decode("utf-8", "replace"))
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            record = json.loads(line)
            self.lines.append(record)
            if record["message"].startswith("listening on") and not self.port.called:
                self.port.callback(record["port"])
            if record["message"].startswith("consuming ") and not self.consuming.called:
                self.consuming.callback(None)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        LOGGED_TEXT.append(data.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback((reason.value.exitCode, reason.value.signal))  # type: ignore[attr-defined]

    async def terminate(self, seconds: float = 30) -> tuple[int | None, int | None]:
        """Send SIGTERM, as systemd stops a service; its (exit code, signal) once it ends."""
        assert self.transport is not None, "terminate() before the process started"
        self.transport.signalProcess("TERM")
        return await bounded(self.ended, seconds)


# Sets RLIMIT_NOFILE to (argv[1], argv[2]), then becomes argv[3:], as a shell's `ulimit` would.
_WITH_OPEN_FILES = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
    "os.execv(sys.argv[3], sys.argv[3:])"
)


def spawn_twistd(
    environ: Mapping[str, str],
    cwd: Path,
    *,
    open_files: tuple[int, int] | None = None,
    listening_socket: socket.socket | None = None,
) -> tuple[TwistdProcess, Any]:
    """Start ``twistd -n sse-server`` with only ``environ`` (and PATH) as its environment,
    and with ``open_files`` as its (soft, hard) open-file limit when given.

    With ``listening_socket``, the server gets it the way systemd passes a socket unit's
    socket (sd_listen_fds(3)): as descriptor 3, with LISTEN_FDS=1, LISTEN_FDNAMES and
    LISTEN_PID naming the server's own process (the shell sets it to its pid, then execs)."""
    process = TwistdProcess()
    command = [str(TWISTD), "-n", "--pidfile=", "sse-server"]
    child_descriptors: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
    environ = {"PATH": os.environ["PATH"], **environ}
    if listening_socket is not None:
        command = ["/bin/sh", "-c", 'export LISTEN_PID=$$; exec "$@"', "sh", *command]
        child_descriptors[3] = listening_socket.fileno()
        environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="https")
    if open_files is not None:
        command = [sys.executable, "-c", _WITH_OPEN_FILES, *map(str, open_files), *command]
    transport = reactor.spawnProcess(  # type: ignore[attr-defined]
        process, command[0], command, env=environ, path=str(cwd), childFDs=child_descriptors
    )
    return process, transport


def _until_ready(port: int, ca: Path) -> None:
    """Ask ``/readyz`` on ``port`` until it answers 200 (blocking: run it in a thread)."""
    context = ssl.create_default_context(cafile=str(ca))
    while True:
        connection = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
        try:
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return
        finally:
            connection.close()
        time.sleep(0.05)


class Instance:
    """A twistd process serving on its own port (``SSE_PORT``), sharing the stream with the
    others."""

    def __init__(self, environ: dict[str, str], cwd: Path) -> None:
        self.process, self.transport = spawn_twistd(environ, cwd)
        self.port = 0
        self._ca = Path(environ["SSE_CERTS_DIR"]) / "ca.pem"

    async def ready(self, seconds: float = 30) -> None:
        """Once it listens, consumes and answers ``/readyz`` with 200 (its read-back is
        over): when a load balancer would start sending it browsers. Each step may take
        ``seconds``."""
        self.port = await bounded(self.process.port, seconds)
        await bounded(self.process.consuming, seconds)
        await bounded(deferToThread(_until_ready, self.port, self._ca), seconds)

    def url(self, topic: str, userid: str, token: str) -> str:
        return f"https://localhost:{self.port}/subscribe/{topic}/{userid}/{token}"

    async def kill(self, how: int) -> None:
        self.transport.signalProcess(how)
        await bounded(self.process.ended, 30)
