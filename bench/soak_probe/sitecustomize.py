"""Loaded into the server under ``make soak`` only (through ``PYTHONPATH``), never shipped.

On ``SIGUSR2`` it collects garbage, counts the objects the collector tracks, reads the RSS,
hands the allocator's free pages back to the kernel (glibc ``malloc_trim(0)``) and reads the
RSS again, then writes the figures as one JSON line to ``$SSE_SOAK_PROBE_FILE``. The RSS
after trimming is what the live objects need; before it, what glibc happens to keep.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
from types import FrameType


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _probe(signum: int, frame: FrameType | None) -> None:
    gc.collect()
    objects = len(gc.get_objects())
    rss_kib = _rss_kib()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    figures = {"objects": objects, "rss_kib": rss_kib, "trimmed_rss_kib": _rss_kib()}
    with open(os.environ["SSE_SOAK_PROBE_FILE"], "a") as probe_file:
        probe_file.write(json.dumps(figures) + "\n")


if os.environ.get("SSE_SOAK_PROBE_FILE"):
    signal.signal(signal.SIGUSR2, _probe)
