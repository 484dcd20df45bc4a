"""``make run`` as a developer uses it, in a terminal: the demo URLs come below the start-up
log, and Ctrl-C (typed into the terminal) stops the server, and make with status 0."""

from __future__ import annotations

import fcntl
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _in_terminal() -> None:
    """In the child, a session leader: make the pseudo-terminal on stdin its terminal, and
    take SIGINT as a shell in a terminal would (not inherited ignored)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("psql") is None, reason="no make")
def test_make_run_prints_the_demo_urls_last_and_ctrl_c_ends_it_with_status_0(
    tmp_path: Path, plaintext_environ: dict[str, str], local_database: dict[str, str]
) -> None:
    environ = {
        **os.environ,
        "SSE_METRICS_PORT": "0",
        "SSE_RABBITMQ_QUEUE_NAME": plaintext_environ["SSE_RABBITMQ_QUEUE_NAME"],
        "SSE_LOGS_DIR": str(tmp_path / "logs"),
    }
    command = [
        *("make", "--no-print-directory", "-o", f"{BIN}/twistd", "run", f"BIN={BIN}"),
        f"CERTS_DIR={tmp_path / 'certs'}",
        f"PORT={_free_port()}",
        f"PGDATABASE={local_database['SSE_POSTGRES_DB_NAME']}",
    ]
    terminal, child_terminal = os.openpty()
    make = subprocess.Popen(
        command,
        cwd=REPOSITORY,
        env=environ,
        stdin=child_terminal,
        stdout=child_terminal,
        stderr=child_terminal,
        start_new_session=True,
        preexec_fn=_in_terminal,
    )
    os.close(child_terminal)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        with open(terminal, encoding="utf-8", errors="replace", newline="") as output:
            try:
                for line in output:
                    lines.put(line.rstrip("\r\n"))
            except OSError:
                pass  # EIO: every process holding the terminal has ended
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        while not (seen and seen[-1].startswith("demo page:")):
            line = lines.get(timeout=60)
            assert line is not None, "\n".join(seen)
            seen.append(line)
        os.write(terminal, b"\x03")  # Ctrl-C
        assert make.wait(timeout=30) == 0, "\n".join(seen)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    output = "\n".join(seen)
    [stream] = [n for n, line in enumerate(seen) if line.startswith("demo stream: curl -N")]
    listening = next(n for n, line in enumerate(seen) if '"message": "listening on' in line)
    consuming = next(n for n, line in enumerate(seen) if '"message": "consuming ' in line)
    assert listening < consuming < stream
    assert seen[stream + 1].startswith("demo page:   https://localhost:")
    assert "Main loop terminated." in output, "the server's last lines were read"
    assert "make: ***" not in output
