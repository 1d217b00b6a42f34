"""This process's peak resident memory, for run reports and training stats.

`getrusage(RUSAGE_SELF).ru_maxrss` is not it on Linux: it survives execve, so a job started
from a large process (a benchmark that loaded a model, a notebook) reports its parent's peak
(measured: a 10 MB child of a 400 MB parent reported 412 MB). /proc's VmHWM starts afresh at
exec; ru_maxrss stays the fallback where /proc is absent (macOS: bytes there, KiB on Linux).
"""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
