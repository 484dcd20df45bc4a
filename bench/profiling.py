"""py-spy attached to the server during a scenario, and the top costs of what it sampled.

Native frames are sampled too (``--native``), so C time is split into what it is: OpenSSL,
the cyclic garbage collector, system calls.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``), the input
of flamegraph.pl and speedscope. The summary ranks functions by *self* samples (where the
CPU was) and by *inclusive* samples (what the time was spent for).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "py_spy", "summarise"]

# Frames every sample of a twistd process passes through: they rank first and say nothing.
_PLUMBING = frozenset(
    {
        "<module>",
        "run",
        "runApp",
        "runReactorWithLogging",
        "UnixApplicationRunner.postApplication",
        "ApplicationRunner.run",
        "ApplicationRunner.startReactor",
        "ReactorBase.run",
        "ReactorBase.mainLoop",
        "EPollReactor.doPoll",
        "_PollLikeMixin._doReadOrWrite",
        "callWithLogger",
        "callWithContext",
        "ContextTracker.callWithContext",
        "ThreadedContextTracker.callWithContext",
    }
)
# Blocking waits: py-spy's --native sampling counts them as active, but they cost no CPU
# (the reactor's epoll_wait, idle threads of Twisted's thread pool).
_WAITING = frozenset({"epoll_wait", "epoll_pwait", "PyThread_acquire_lock_timed", "Condition.wait"})
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def py_spy() -> str | None:
    """The py-spy executable beside this Python, or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    if match["function"].startswith("0x"):
        # A native frame without a symbol: all that is known is its library.
        return f"[{path.rsplit('/', 1)[-1]}]"
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/", "sse-bench-"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive sample shares of the functions in a collapsed-stack file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_short(frame) for frame in stack.split(";")]
        # The first frame is the thread ("process 123:..."), when py-spy adds one.
        frames = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        if not frames or any(frame.split(" ", 1)[0] in _WAITING for frame in frames):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def ranked(counter: Counter[str], unresolved: bool) -> list[dict[str, Any]]:
        return [
            {"function": name, "percent": round(100 * count / max(total, 1), 1)}
            for name, count in counter.most_common()
            if name.split(" ", 1)[0] not in _PLUMBING and (unresolved or name[0] != "[")
        ][:top]

    # Unresolved native frames sit under every stack (the C start-up): as a cost they only
    # mean something where the CPU was.
    return {
        "samples": total,
        "self": ranked(own, unresolved=True),
        "inclusive": ranked(inclusive, unresolved=False),
    }


class Profiler:
    """``py-spy record`` of one process, from L{start} to L{stop}."""

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        self._pid = pid
        self._output = output
        self._rate = rate
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        executable = py_spy()
        if executable is None:
            raise RuntimeError("py-spy is not installed: pip install -r bench/requirements.txt")
        self._output.parent.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            executable,
            "record",
            "--pid",
            str(self._pid),
            "--rate",
            str(self._rate),
            "--format",
            "raw",
            "--output",
            str(self._output),
            # Native frames show what Python frames hide (OpenSSL, the cyclic GC, syscalls);
            # they need the target paused for each sample, a few percent of its CPU.
            "--native",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        # py-spy needs a moment to attach; samples before that are lost, not wrong.
        await asyncio.sleep(0.5)

    async def stop(self) -> dict[str, Any]:
        """Stop sampling (SIGINT makes py-spy write its file) and summarise."""
        assert self._process is not None
        self._process.send_signal(signal.SIGINT)
        try:
            _, errors = await asyncio.wait_for(self._process.communicate(), 30)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
            errors = b"timed out"
        if not self._output.exists():
            return {"error": errors.decode("utf-8", "replace")[-500:]}
        return {"file": str(self._output), **summarise(self._output)}
