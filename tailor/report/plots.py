"""PNG figures for the report, MLflow and the Prefect UI (matplotlib, headless)."""

from __future__ import annotations

import base64
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and workers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

STRATEGY_LABELS = {
    "block_influence": "block influence (1 - cos in/out)",
    "angular": "angular distance of an n-layer block starting here",
    "leave_one_out": "calibration perplexity increase when skipped",
}


def layer_scores_png(series: dict[str, list[float]], removed: dict[str, list[int]], path: Path) -> Path:
    """One panel per score, bars per layer index; the layers each strategy removes in red
    (for angular, the start of the removed block)."""
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.6 * len(series)), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        chosen = removed.get(name, [])
        marked = chosen[:1] if name == "angular" else chosen
        colours = ["tab:red" if i in marked else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), [0 if math.isnan(v) else v for v in values], color=colours)
        ax.set_title(f"{STRATEGY_LABELS.get(name, name)}; removes {chosen}", fontsize=9)
        ax.set_xticks(range(len(values)))
        ax.set_xlabel("decoder layer index")
    return _save(fig, path)


def lines_png(
    x_label: str, y_label: str, lines: dict[str, tuple[list[float], list[float]]], title: str, path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grouped_bars_png(
    groups: list[str],
    bars: dict[str, list[float]],
    y_label: str,
    title: str,
    path: Path,
    intervals: dict[str, list[tuple[float, float] | None]] | None = None,
) -> Path:
    """One bar per (group, series); ``intervals`` (low, high) per bar, same keys and order, draw
    error bars (None: that bar has none)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(bars))
    for k, (label, values) in enumerate(bars.items()):
        yerr = _error_offsets(values, intervals[label]) if intervals and label in intervals else None
        ax.bar(
            [i + k * width for i in range(len(groups))],
            values,
            width,
            label=label,
            yerr=yerr,
            capsize=3,
            error_kw={"elinewidth": 1},
        )
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _error_offsets(values: list[float], intervals: list[tuple[float, float] | None]) -> list[list[float]]:
    """Matplotlib's ``yerr``: distances below and above each bar; NaN draws no bar for it."""
    below = [v - iv[0] if iv else math.nan for v, iv in zip(values, intervals)]
    above = [iv[1] - v if iv else math.nan for v, iv in zip(values, intervals)]
    return [below, above]


def errorbar_png(
    xs: list[int],
    points: list[tuple[float, float, float]],
    labels: list[str],
    levels: dict[str, float],
    x_label: str,
    y_label: str,
    title: str,
    path: Path,
) -> Path:
    """(value, low, high) per x as a line with interval bars, each point labelled; ``levels`` draws
    labelled horizontal lines (references, margins)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ys = [p[0] for p in points]
    ax.errorbar(
        xs,
        ys,
        yerr=[[y - p[1] for y, p in zip(ys, points)], [p[2] - y for y, p in zip(ys, points)]],
        marker="o",
        capsize=4,
    )
    for (label, level), style in zip(levels.items(), ("-", "--", ":")):
        ax.axhline(level, ls=style, lw=0.8, color="grey" if style == "-" else "tab:red", label=label)
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def embed_markdown(path: Path, alt: str) -> str:
    """The PNG inline as a data URI, so a markdown artifact shows it without file access."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})"


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
