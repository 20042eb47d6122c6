"""Uncertainty of accuracy differences between two models scored on the same items."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Bootstrap means of few-valued scores (0/1 accuracies) are fractions whose float sums can miss
# an exact zero by an ulp (a pooled lower end of 5.6e-17 was once reported as a significant
# gain). Bounds are rounded to this many places, far below any difference a sample resolves,
# so an interval that touches zero says so.
BOUND_DECIMALS = 12


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``samples`` (NaNs ignored), bounds
    rounded to ``BOUND_DECIMALS`` places."""
    alpha = (1 - level) / 2
    low, high = np.nanquantile(samples, [alpha, 1 - alpha])
    return float(np.round(low, BOUND_DECIMALS)), float(np.round(high, BOUND_DECIMALS))


def paired_bootstrap(
    base: Sequence[float], other: Sequence[float], iters: int = 2000, seed: int = 0, level: float = 0.95
) -> dict[str, float | bool]:
    """Mean of ``other - base`` over paired items and its percentile bootstrap interval.

    Items are resampled with replacement as pairs, so the interval reflects the
    noise of the item sample, not of two independent samples. ``significant`` is
    true when the interval excludes zero.
    """
    if len(base) != len(other):
        raise ValueError(f"paired items differ in number: {len(base)} vs {len(other)}")
    if not base:
        raise ValueError("no paired items")
    diffs = np.asarray(other, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty(iters)
    chunk = max(1, 2_000_000 // len(diffs))  # bound the index matrix to ~16 MB
    for start in range(0, iters, chunk):
        stop = min(iters, start + chunk)
        means[start:stop] = diffs[rng.integers(0, len(diffs), size=(stop - start, len(diffs)))].mean(axis=1)
    low, high = percentile_interval(means, level)
    return {
        "delta": float(diffs.mean()),
        "ci_low": float(low),
        "ci_high": float(high),
        "significant": bool(low > 0 or high < 0),
        "n": int(len(diffs)),
    }


def doc_order(doc_id: str) -> tuple[int, str]:
    """Numeric order of lm-eval's string document ids ("2" before "10")."""
    return len(doc_id), doc_id


def paired_values(
    base_items: dict[str, dict[str, float]], other_items: dict[str, dict[str, float]], metric: str
) -> tuple[list[float], list[float]]:
    """``metric`` of the documents both evaluations scored, in one order for both."""
    shared = sorted(set(base_items) & set(other_items), key=doc_order)
    shared = [k for k in shared if metric in base_items[k] and metric in other_items[k]]
    return [base_items[k][metric] for k in shared], [other_items[k][metric] for k in shared]


def paired_item_deltas(
    base_items: dict[str, dict[str, float]], other_items: dict[str, dict[str, float]], metric: str
) -> dict[str, float | bool] | None:
    """paired_bootstrap over the documents both evaluations scored for ``metric``."""
    base, other = paired_values(base_items, other_items, metric)
    return paired_bootstrap(base, other) if base else None


def score_interval(score: dict, low: float = 0.0, high: float = 1.0, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of one model's score on one task (``{"value", "stderr"}``, the standard error
    the report prints beside it): value ± 1.96 standard errors, kept within [low, high] (an
    accuracy cannot leave 0..1). None without a standard error."""
    stderr = score.get("stderr")
    if stderr is None:
        return None
    return max(low, score["value"] - z * stderr), min(high, score["value"] + z * stderr)
