"""Process resource readings for the report."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
import time
from dataclasses import dataclass


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB elsewhere


@dataclass(frozen=True)
class StageCost:
    """What a stage took: wall seconds and the process's peak RSS when it ended."""

    seconds: float
    peak_rss_gib: float


def stage_cost(start: float) -> StageCost:
    """Seconds since ``start`` (a ``time.perf_counter()`` reading) and the process's peak RSS."""
    return StageCost(time.perf_counter() - start, peak_rss_gib())


def stage_start() -> float:
    """Start a stage with the memory earlier stages freed handed back to the OS; returns a
    ``time.perf_counter()`` reading for :func:`stage_cost`.

    glibc keeps freed heap memory for reuse: after a stage that held gigabytes of logits
    the process would otherwise stay that large, and the next stage's peak stacks on top.
    """
    gc.collect()
    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:  # glibc only (not musl)
            trim(0)
    return time.perf_counter()
