"""Helpers shared by the benchmark scripts (not part of the product)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_work_dir() -> str:
    """$TAILOR_HOME, else the repository's tailor-work/ (wherever the script is started from)."""
    return str(Path(os.environ.get("TAILOR_HOME") or Path(__file__).resolve().parents[1] / "tailor-work").resolve())


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """This CPU's dense matmul throughput, measured now (GFLOP/s)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def print_summary(summary: dict) -> None:
    """The last line of every benchmark: one JSON object with every figure printed."""
    print(json.dumps(summary, sort_keys=True))


def parse_cut(text: str, num_layers: int) -> list[int]:
    """'14-17' -> [14, 15, 16, 17]; '2,8,9,16' -> [2, 8, 9, 16]."""
    if "-" in text:
        first, last = (int(x) for x in text.split("-"))
        layers = list(range(first, last + 1))
    else:
        layers = sorted(int(x) for x in text.split(","))
    if not layers or min(layers) < 0 or max(layers) >= num_layers or len(set(layers)) != len(layers):
        raise SystemExit(f"cut {text!r}: layer indices must be distinct and in 0..{num_layers - 1}")
    return layers
