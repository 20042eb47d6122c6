"""Process resource readings for the report."""

from __future__ import annotations

import resource
import sys
import time


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB elsewhere


def stage_cost(start: float) -> dict[str, float]:
    """Seconds since ``start`` (a ``time.perf_counter()`` reading) and the process's peak RSS."""
    return {"seconds": time.perf_counter() - start, "peak_rss_gib": peak_rss_gib()}
