"""What the process costs: CPU, resident memory, file descriptors (Linux /proc; elsewhere
what the standard library can tell)."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path
from typing import Final

_PROC: Final = Path("/proc/self")
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_IMPORTED: Final = time.time()


def _start_time() -> float:
    """Seconds since the epoch when the process started (/proc), else this import's time."""
    try:
        # Field 22 of /proc/self/stat, after the parenthesised command name.
        ticks = int((_PROC / "stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return _IMPORTED


_STARTED: Final = _start_time()


def process_stats() -> dict[str, float]:
    """cpu_s, rss_bytes, open_fds, max_fds and start_time_s of this process."""
    times = os.times()
    stats: dict[str, float] = {
        "cpu_s": times.user + times.system,
        "max_fds": float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        "start_time_s": _STARTED,
    }
    try:
        pages = int((_PROC / "statm").read_text().split()[1])
        stats["rss_bytes"] = float(pages * _PAGE_SIZE)
    except (OSError, IndexError, ValueError):
        # ru_maxrss is the peak, in KiB on Linux: the best there is without /proc.
        stats["rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    with contextlib.suppress(OSError):  # no /proc: the series is left out
        stats["open_fds"] = float(len(os.listdir(_PROC / "fd")))
    return stats
