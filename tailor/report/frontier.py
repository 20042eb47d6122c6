"""The size-quality frontier: per cut size, what the best healed cut keeps of the original and what it buys.

Each row compares one healed model with the original on the same documents: per task and
pooled accuracy change (paired bootstrap 95% intervals), mean retention, parameters,
multiply-adds per token and the measured generation speed-up with its interval. A task is
*within* the margin when its interval's lower end is above ``-max_drop``, *beyond* it when the
upper end is below, and *cannot tell* otherwise; the answer to "how far can I cut" is the
largest size whose every task is within.
"""

from __future__ import annotations

from pathlib import Path

from tailor.common.stats import paired_bootstrap, paired_values
from tailor.evaluate.speed import speedup_interval
from tailor.report.compare import mean_acc_retention
from tailor.report.plots import errorbar_png

WITHIN, BEYOND, CANNOT_TELL = "within", "beyond", "cannot tell"


def verdict(delta: dict, max_drop: float) -> str:
    """Where a paired interval of distilled - original lies against the margin ``-max_drop``."""
    if delta["ci_low"] >= -max_drop:
        return WITHIN
    if delta["ci_high"] < -max_drop:
        return BEYOND
    return CANNOT_TELL


def frontier_rows(original: dict, healed: list[dict], max_drop: float) -> list[dict]:
    """One row per size. ``original`` and each of ``healed`` carry "metrics", "items" (per-document
    scores) and "profile" (``profile_checkpoints``); each healed entry also "size",
    "removed_layers", "heldout_ppl" and "candidates" ([{"removed_layers", "heldout_ppl"}] of the
    short heal that chose the cut)."""
    base = original["profile"]
    rows = []
    for h in sorted(healed, key=lambda h: h["size"]):
        per_task, base_pool, pool = {}, [], []
        for task, metrics in original["metrics"].items():
            if "acc" not in metrics:
                continue
            a, b = paired_values(original["items"].get(task, {}), h["items"].get(task, {}), "acc")
            if a:
                per_task[task] = {**paired_bootstrap(a, b), "verdict": None}
                per_task[task]["verdict"] = verdict(per_task[task], max_drop)
                base_pool += a
                pool += b
        pooled = paired_bootstrap(base_pool, pool) if base_pool else None
        profile = h["profile"]
        speed = (
            speedup_interval(base["run_times_s"], profile["run_times_s"])
            if base.get("run_times_s") and profile.get("run_times_s")
            else None
        )
        rows.append(
            {
                "size": h["size"],
                "removed_layers": h["removed_layers"],
                "candidates": h["candidates"],
                "heldout_ppl": h["heldout_ppl"],
                "params": profile["params"],
                "params_saved_pct": 100.0 * (base["params"] - profile["params"]) / base["params"],
                "macs_per_token": profile["macs_per_token"],
                "macs_ratio": base["macs_per_token"] / profile["macs_per_token"],
                "speedup": speed["median"] if speed else base["gen_time_mean_s"] / profile["gen_time_mean_s"],
                "speedup_ci95": speed["ci95"] if speed else None,
                "mean_acc_retention_pct": mean_acc_retention(original["metrics"], h["metrics"]),
                "acc_delta_pooled": pooled,
                "acc_delta_per_task": per_task,
                "within_margin": bool(per_task) and all(t["verdict"] == WITHIN for t in per_task.values()),
            }
        )
    return rows


def largest_within(rows: list[dict]) -> dict | None:
    """The row removing the most layers whose every task is within the margin (None: no size is)."""
    within = [r for r in rows if r["within_margin"]]
    return max(within, key=lambda r: r["size"]) if within else None


def render_markdown(rows: list[dict], original: dict, max_drop: float, plot_markdown: str = "") -> str:
    """frontier.md: the table, each size's candidates, and the answer with its margin."""
    tasks = sorted({t for r in rows for t in r["acc_delta_per_task"]})
    lines = [
        "# llm-tailor size-quality frontier",
        "",
        "Each size's cut was chosen among contiguous blocks by held-out corpus perplexity after a short heal, "
        "then healed with the profile's recipe. Every model is scored on the same documents as the original; "
        "Δ is healed − original accuracy with its paired bootstrap 95% interval. A task is *within* the "
        f"margin when its interval stays above −{max_drop:g}, *beyond* it when it lies wholly below, and "
        "*cannot tell* otherwise.",
        "",
        f"Original: {original['params']:,} parameters, "
        f"{original['macs_per_token'] / 1e6:.1f}M multiply-adds per token.",
        "",
        "| layers removed | which | parameters | multiply-adds / token (M) | speed-up [95% CI] | pooled Δ [95% CI] | "
        + " | ".join(f"{t} Δ [95% CI]" for t in tasks)
        + " | mean retention | within margin |",
        "|" + "---|" * (7 + len(tasks)),
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}x" + (" [{:.2f}, {:.2f}]".format(*r["speedup_ci95"]) if r["speedup_ci95"] else "")
        cells = [
            str(r["size"]),
            " ".join(map(str, r["removed_layers"])),
            f"{r['params']:,}",
            f"{r['macs_per_token'] / 1e6:.1f}",
            speed,
            _delta(r["acc_delta_pooled"]),
            *(_delta(r["acc_delta_per_task"].get(t), with_verdict=True) for t in tasks),
            "" if r["mean_acc_retention_pct"] is None else f"{r['mean_acc_retention_pct']:.1f}%",
            "yes" if r["within_margin"] else "no",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    best = largest_within(rows)
    lines += [
        "",
        (
            f"**Largest cut within the margin:** {best['size']} layers ({' '.join(map(str, best['removed_layers']))}), "
            f"{best['speedup']:.2f}x in generation, every task's interval above −{max_drop:g}."
            if best
            else f"**No size is within the margin:** at every size at least one task's interval reaches below "
            f"−{max_drop:g} (beyond it, or cannot tell on these documents)."
        ),
        "",
        "## How each cut was chosen",
        "",
        "| layers removed | candidate | held-out perplexity after the short heal |",
        "|---|---|---|",
    ]
    for r in rows:
        for c in r["candidates"]:
            chosen = " (chosen)" if c["removed_layers"] == r["removed_layers"] else ""
            lines.append(
                f"| {r['size']} | {' '.join(map(str, c['removed_layers']))}{chosen} | {c['heldout_ppl']:.2f} |"
            )
    if plot_markdown:
        lines += ["", plot_markdown]
    return "\n".join(lines) + "\n"


def _delta(d: dict | None, with_verdict: bool = False) -> str:
    if not d:
        return ""
    text = f"{d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return f"{text} ({d['verdict']})" if with_verdict else text


def frontier_png(rows: list[dict], original_pooled_acc: float, max_drop: float, path: Path) -> Path:
    """Pooled accuracy as a share of the original's against layers removed, with 95% interval bars,
    the margin as a line and each size's speed-up beside its point."""

    def share(delta: float) -> float:
        return 100 * (original_pooled_acc + delta) / original_pooled_acc

    points = [tuple(share(r["acc_delta_pooled"][k]) for k in ("delta", "ci_low", "ci_high")) for r in rows]
    return errorbar_png(
        [r["size"] for r in rows],
        points,
        [f"{r['speedup']:.2f}x" for r in rows],
        {
            "original": 100.0,
            f"original − {max_drop:g} (pooled)": 100 * (original_pooled_acc - max_drop) / original_pooled_acc,
        },
        "decoder layers removed",
        "pooled accuracy, % of the original's",
        "Size-quality frontier (labels: generation speed-up)",
        path,
    )


def pooled_accuracy(original: dict) -> float:
    """The original's accuracy pooled over every scored document of every task with ``acc``."""
    values = [
        float(item["acc"])
        for task, metrics in original["metrics"].items()
        if "acc" in metrics
        for item in original["items"].get(task, {}).values()
    ]
    return sum(values) / len(values)
