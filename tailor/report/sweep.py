"""Pruning sweep: several strategies x several layer counts, compared on the same documents.

Each combination's accuracy is compared with the original's over the same documents:
mean retention across tasks, and a paired bootstrap 95% interval of the accuracy
difference pooled over every document of every task (and per task). The best
combination is picked by a stated rule, so that it can feed distillation.
"""

from __future__ import annotations

from pathlib import Path

from tailor.common.stats import paired_bootstrap, paired_values
from tailor.report.compare import mean_acc_retention
from tailor.report.plots import lines_png

BEST_RULE = (
    "among the combinations removing the most layers, the highest mean accuracy retention (ties: the higher speed-up)"
)


def sweep_rows(original: dict, combos: list[dict]) -> list[dict]:
    """One row per combination.

    ``original`` and each combo carry "metrics" and "items" (per-document scores) and
    "profile" (params, gen_time_mean_s); combos also "strategy", "num_layers", "removed_layers".
    """
    rows = []
    for c in combos:
        per_task, base_pool, model_pool = {}, [], []
        for task, metrics in original["metrics"].items():
            if "acc" not in metrics:
                continue
            base, other = paired_values(original["items"].get(task, {}), c["items"].get(task, {}), "acc")
            if base:
                per_task[task] = paired_bootstrap(base, other)
                base_pool += base
                model_pool += other
        pooled = paired_bootstrap(base_pool, model_pool) if base_pool else None
        base_params = original["profile"]["params"]
        rows.append(
            {
                "strategy": c["strategy"],
                "num_layers": c["num_layers"],
                "removed_layers": c["removed_layers"],
                "params": c["profile"]["params"],
                "params_saved_pct": 100.0 * (base_params - c["profile"]["params"]) / base_params,
                "speedup": original["profile"]["gen_time_mean_s"] / c["profile"]["gen_time_mean_s"],
                "mean_acc_retention_pct": mean_acc_retention(original["metrics"], c["metrics"]),
                "acc_delta_pooled": pooled,
                "acc_delta_per_task": per_task,
            }
        )
    return rows


def best_row(rows: list[dict]) -> dict:
    """The combination chosen by ``BEST_RULE``."""
    most = max(r["num_layers"] for r in rows)
    candidates = [r for r in rows if r["num_layers"] == most and r["mean_acc_retention_pct"] is not None]
    return max(candidates, key=lambda r: (r["mean_acc_retention_pct"], r["speedup"]))


def table(rows: list[dict]) -> list[dict]:
    """Flat rows for a table artifact / CSV: one line per combination."""
    out = []
    for r in rows:
        pooled = r["acc_delta_pooled"] or {}
        out.append(
            {
                "strategy": r["strategy"],
                "layers removed": r["num_layers"],
                "which": " ".join(map(str, r["removed_layers"])),
                "params saved %": round(r["params_saved_pct"], 2),
                "speed-up": round(r["speedup"], 3),
                "mean acc retention %": None
                if r["mean_acc_retention_pct"] is None
                else round(r["mean_acc_retention_pct"], 2),
                "Δacc pooled": None if not pooled else round(pooled["delta"], 4),
                "95% CI": None if not pooled else f"[{pooled['ci_low']:+.4f}, {pooled['ci_high']:+.4f}]",
                "significant": None if not pooled else pooled["significant"],
            }
        )
    return out


def render_markdown(rows: list[dict], best: dict, plot_markdown: str = "") -> str:
    flat = table(rows)
    head = list(flat[0])
    lines = [
        "# llm-tailor pruning sweep",
        "",
        "Accuracy retention vs the original over the same documents; Δacc is the paired difference "
        "pooled over every document of every task with its bootstrap 95% interval (significant when "
        "it excludes zero).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in flat:
        lines.append("| " + " | ".join("" if row[k] is None else str(row[k]) for k in head) + " |")
    lines += [
        "",
        f"**Best** ({BEST_RULE}): `{best['strategy']}` removing {best['num_layers']} layers "
        f"{best['removed_layers']}, mean retention {best['mean_acc_retention_pct']:.1f}%.",
        "",
    ]
    if plot_markdown:
        lines += [plot_markdown, ""]
    return "\n".join(lines)


def retention_plot(rows: list[dict], path: Path) -> Path:
    """Retention vs layers removed, one line per strategy."""
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["num_layers"]):
        xs, ys = lines.setdefault(r["strategy"], ([], []))
        xs.append(r["num_layers"])
        ys.append(r["mean_acc_retention_pct"])
    return lines_png(
        "decoder layers removed",
        "mean accuracy retention (%)",
        lines,
        "Pruning sweep: accuracy kept vs layers removed",
        path,
    )
