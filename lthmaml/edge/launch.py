"""When this process started: both device commands report their start-up (Python, imports, reading
the model) from the process's birth, so their timings compare. Torch-free."""

from __future__ import annotations

import os
import time
from pathlib import Path


def process_start() -> float:
    """When this process started, on ``time.perf_counter``'s clock (Linux: from /proc; elsewhere:
    when this module was imported, which leaves out Python's and the imports' start-up)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.perf_counter() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return IMPORTED


IMPORTED = time.perf_counter()
