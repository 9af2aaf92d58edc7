"""Machine facts and a CPU-load meter shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


class CpuMeter:
    """Average CPU use of *other* processes (in cores) over a stretch of wall time.

    Busy time from ``/proc/stat`` (all CPUs) minus this process's own CPU time and
    that of its waited-for children (``os.times``).  A shared machine makes timings
    noisy; a multi-threaded BLAS suffers most when another process holds a core.
    Returns None where ``/proc/stat`` is not available.
    """

    def __init__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()

    def others(self) -> float | None:
        busy1 = _busy_seconds()
        if busy1 is None or self.busy0 is None:
            return None
        wall = time.perf_counter() - self.t0
        other = (busy1 - self.busy0) - (_own_seconds() - self.own0)
        return max(other, 0.0) / wall if wall > 0 else None


def _busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"
