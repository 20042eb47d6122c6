"""The final comparison of original, pruned and distilled models: report.json and report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tailor.common.stats import paired_item_deltas, score_interval
from tailor.evaluate.speed import speedup_interval
from tailor.report.evaluation import evaluation_markdown
from tailor.report.healing import healing_summary
from tailor.report.precision import precision_markdown
from tailor.store.checkpoint import write_file_atomically

MODELS = ("original", "pruned", "distilled")
# Lower is better for these; retention is then original / model.
LOWER_IS_BETTER = {"perplexity"}


def retention_pct(metric: str, original: float, value: float) -> float | None:
    """How much of the original's quality a model keeps, in percent (100 = no loss)."""
    if metric in LOWER_IS_BETTER:
        return 100.0 * original / value if value else None
    return 100.0 * value / original if original else None


def mean_acc_retention(original: dict[str, dict], model: dict[str, dict]) -> float | None:
    """Mean over the tasks reporting accuracy of ``retention_pct``; metrics keyed task -> metric."""
    values = [
        retention_pct("acc", original[t]["acc"]["value"], model[t]["acc"]["value"])
        for t in original
        if "acc" in original[t]
    ]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def build_report(profiles: dict[str, dict], evals: dict[str, dict], extra: dict) -> dict:
    """Join per-model profiles and evaluations into one report with deltas and retention.

    profiles/evals are keyed by MODELS; ``extra`` carries run facts (config, pruning,
    distillation record) copied verbatim into the report.
    """
    models = {}
    for name in MODELS:
        models[name] = {**profiles[name], "metrics": evals[name]["metrics"]}
    base = models["original"]
    changes: dict[str, dict] = {}
    for name in MODELS[1:]:
        m = models[name]
        per_task = {}
        for task, metrics in m["metrics"].items():
            per_task[task] = {}
            for metric, score in metrics.items():
                orig = base["metrics"][task][metric]["value"]
                per_task[task][metric] = {
                    "value": score["value"],
                    "delta": score["value"] - orig,
                    "retention_pct": retention_pct(metric, orig, score["value"]),
                }
                items_base = evals["original"].get("items", {}).get(task)
                items_model = evals[name].get("items", {}).get(task)
                if items_base and items_model:
                    # Paired over the same documents: 95% bootstrap interval of the difference.
                    paired = paired_item_deltas(items_base, items_model, metric)
                    if paired is not None:
                        per_task[task][metric]["paired_ci95"] = [paired["ci_low"], paired["ci_high"]]
                        per_task[task][metric]["significant"] = paired["significant"]
                        per_task[task][metric]["n"] = paired["n"]
                        # Smallest true change this sample detects 80% of the time at the 5% level.
                        per_task[task][metric]["min_detectable"] = 2.8 * (paired["ci_high"] - paired["ci_low"]) / 3.92
        changes[name] = {
            "tasks": per_task,
            "mean_acc_retention_pct": mean_acc_retention(base["metrics"], m["metrics"]),
            **_speedup(_timing(models, "original"), _timing(models, name)),
            "tokens_per_s_ratio": m["tokens_per_s"] / base["tokens_per_s"],
            "timed_as": m.get("timed_as", name),
            "macs_per_token": m.get("macs_per_token"),
            # Original / model, like the speed-up: above 1 = fewer multiply-adds, fewer parameters.
            "macs_ratio": _ratio(base.get("macs_per_token"), m.get("macs_per_token")),
            "params_ratio": _ratio(base["params"], m["params"]),
            "params_removed": base["params"] - m["params"],
            "params_removed_pct": 100.0 * (base["params"] - m["params"]) / base["params"],
        }
    return {
        "models": models,
        "vs_original": changes,
        "healing": healing_summary(evals),
        "timing_groups": timing_groups(models),
        "speed_tie": speed_tie(models),
        **extra,
    }


def _ratio(base: float | None, value: float | None) -> float | None:
    return base / value if base and value else None


def _timing(models: dict[str, dict], name: str) -> dict:
    """The profile whose run times stand for ``name``'s: the model it was timed as, else its own."""
    return models.get(models[name].get("timed_as"), models[name])


def timing_groups(models: dict[str, dict]) -> dict[str, list[str]]:
    """The models that share one timing, keyed by the model timed for them; only groups of two or more."""
    groups: dict[str, list[str]] = {}
    for name in MODELS:
        groups.setdefault(models[name].get("timed_as", name), []).append(name)
    return {rep: names for rep, names in groups.items() if len(names) > 1}


def _speedup(base: dict, model: dict) -> dict:
    """Median per-round speed-up and its bootstrap interval (interleaved timing), else the ratio of means."""
    if base.get("run_times_s") and model.get("run_times_s"):
        s = speedup_interval(base["run_times_s"], model["run_times_s"])
        return {"speedup": s["median"], "speedup_ci95": s["ci95"]}
    return {"speedup": base["gen_time_mean_s"] / model["gen_time_mean_s"], "speedup_ci95": None}


def _same_architecture(a: dict, b: dict) -> bool:
    if a.get("architecture") and b.get("architecture"):
        return a["architecture"] == b["architecture"]
    # Profiles from before architectures were recorded: the closest they allow telling.
    return a.get("params") == b.get("params") and a.get("layers") == b.get("layers")


def speed_tie(models: dict[str, dict]) -> dict | None:
    """Pruned vs distilled timed separately although of one architecture: their speed ratio's
    interval should hold 1, else the timing is noisy.

    None when there is nothing to compare: the speed stage times each architecture once, so
    pruned and distilled of one architecture share a single timing and cannot disagree; and
    models of different architectures need not tie. Only timings made separately (profiles
    without ``timed_as``, or from different measurements) are checked.
    """
    a, b = models["pruned"], models["distilled"]
    if not (a.get("run_times_s") and b.get("run_times_s")):
        return None
    if a.get("timed_as", "pruned") == b.get("timed_as", "distilled") or not _same_architecture(a, b):
        return None
    s = speedup_interval(a["run_times_s"], b["run_times_s"])
    return {"distilled_vs_pruned": s["median"], "ci95": s["ci95"], "noisy": not s["ci95"][0] <= 1 <= s["ci95"][1]}


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_figures(report: dict, out_dir: Path, layer_scores_png: str | None = None) -> dict[str, str]:
    """PNG figures beside the report: per-task accuracy, distillation loss, generation speed
    (and the pruning's layer scores when a scored strategy chose the layers). Returns
    {caption: file name}."""
    from tailor.report.plots import grouped_bars_png, lines_png

    out_dir = Path(out_dir)
    models = report["models"]
    tasks = [t for t, m in models["original"]["metrics"].items() if "acc" in m]
    figures = {}
    if tasks:
        scores = {n: [models[n]["metrics"][t]["acc"] for t in tasks] for n in MODELS}
        intervals = {n: [score_interval(s) for s in scores[n]] for n in MODELS}
        grouped_bars_png(
            tasks,
            {n: [s["value"] for s in scores[n]] for n in MODELS},
            "accuracy",
            "Accuracy per task (error bars: 95% interval, ±1.96 standard errors)",
            out_dir / "accuracy.png",
            intervals=intervals,
        )
        figures["Accuracy per task"] = "accuracy.png"
    losses = report.get("distillation", {}).get("losses")
    if losses:
        lines_png(
            "optimiser step",
            "distillation loss",
            {"loss": (list(range(1, len(losses) + 1)), losses)},
            "Distillation loss",
            out_dir / "kd_loss.png",
        )
        figures["Distillation loss"] = "kd_loss.png"
    curve = report.get("distillation", {}).get("heldout_curve")
    if curve:
        held = report.get("heldout_perplexity", {})
        references = {
            f"{n} (held-out)": ([curve[0][0], curve[-1][0]], [held[n]["perplexity"]] * 2)
            for n in ("original", "pruned")
            if n in held
        }
        lines_png(
            "optimiser step",
            "held-out perplexity",
            {"student": ([s for s, _ in curve], [v for _, v in curve]), **references},
            "Healing curve: held-out corpus perplexity",
            out_dir / "healing_curve.png",
        )
        figures["Healing curve"] = "healing_curve.png"
    grouped_bars_png(
        ["tokens/s"],
        {n: [models[n]["tokens_per_s"]] for n in MODELS},
        "generated tokens/s",
        "Generation speed (greedy)",
        out_dir / "speed.png",
    )
    figures["Generation speed"] = "speed.png"
    if layer_scores_png:
        shutil.copyfile(layer_scores_png, out_dir / "layer_scores.png")
        figures["Layer scores (removed layers in red)"] = "layer_scores.png"
    return figures


def comparison_table(report: dict) -> list[dict]:
    """One row per task metric: the three models' values and the changes with their intervals."""
    models, changes = report["models"], report["vs_original"]
    rows = []
    for task, metrics in models["original"]["metrics"].items():
        for metric, score in metrics.items():
            row = {"task": task, "metric": metric, "original": round(score["value"], 4)}
            for n in MODELS[1:]:
                c = changes[n]["tasks"][task][metric]
                row[n] = round(models[n]["metrics"][task][metric]["value"], 4)
                row[f"{n} Δ [95% CI]"] = _delta(c).replace("**", "") + (" *" if c.get("significant") else "")
            rows.append(row)
    return rows


def render_markdown(report: dict, figure_dir: Path | None = None) -> str:
    """The report as markdown; with ``figure_dir`` the figures are embedded inline (for UIs
    that cannot read files beside the report)."""
    sections = [
        title_markdown(report),
        models_markdown(report),
        task_metrics_markdown(report),
        evaluation_markdown(report),
        healing_markdown(report),
        pruning_markdown(report),
        continuations_markdown(report),
        figures_markdown(report, figure_dir),
        promotion_markdown(report),
        stage_costs_markdown(report),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"


def title_markdown(report: dict) -> list[str]:
    """The title, and the warning when distillation did harm."""
    lines = [f"# llm-tailor report: profile `{report.get('profile', '?')}`", ""]
    harmed = (report.get("healing") or {}).get("harmed")
    if harmed:
        lines += [
            f"> **Warning: distillation made the model significantly worse than the pruned one on "
            f"{', '.join(harmed)}** (paired 95% interval below zero). The promotion gate refuses it.",
            "",
        ]
    return lines


def models_markdown(report: dict) -> list[str]:
    """The three models side by side: size, multiply-adds, speed, speed-up beside the multiply-add and
    parameter ratios, which models share one timing, and a warning when timing was noisy."""
    models, changes = report["models"], report["vs_original"]
    lines = ["## Models", "", "| | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    rows = [
        ("parameters", lambda m: f"{m['params']:,}"),
        ("decoder layers", lambda m: str(m["layers"])),
        ("checkpoint size (MB)", lambda m: f"{m['checkpoint_bytes'] / 1e6:,.1f}"),
        ("multiply-adds per token (M)", lambda m: _millions(m.get("macs_per_token"))),
        ("generation time per run (s)", lambda m: f"{m['gen_time_mean_s']:.3f} ± {m['gen_time_std_s']:.3f}"),
        ("tokens/s", lambda m: f"{m['tokens_per_s']:.1f}"),
    ]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(models[n]) for n in MODELS) + " |")
    lines.append(
        "| speed-up vs original (median of interleaved rounds [95% CI]) | 1.00x | "
        + " | ".join(
            f"{changes[n]['speedup']:.2f}x"
            + (" [{:.2f}, {:.2f}]".format(*changes[n]["speedup_ci95"]) if changes[n].get("speedup_ci95") else "")
            for n in MODELS[1:]
        )
        + " |"
    )
    for label, key in (
        ("multiply-adds ratio (original / model)", "macs_ratio"),
        ("parameter ratio (original / model)", "params_ratio"),
    ):
        lines.append(f"| {label} | 1.00x | " + " | ".join(_times(changes[n].get(key)) for n in MODELS[1:]) + " |")
    if any(models[n].get("macs_per_token") for n in MODELS):
        lines += [
            "",
            "Multiply-adds per generated token at short context: every linear layer of the decoder layers and the "
            "output head; attention's score products, which grow with the context, are left out.",
        ]
    speed = report.get("config", {}).get("speed")
    if speed:
        lines += [
            "",
            f"Timed on {len(speed['prompts'])} prompt(s) x {speed['max_new_tokens']} new tokens (greedy), "
            f"{speed['timed_runs']} interleaved rounds after {speed['warmup_runs']} warm-up: a speed-up holds for "
            "generation of that length.",
        ]
    groups = report.get("timing_groups") or {}
    if groups:
        lines += [
            "",
            "Timed once per architecture: "
            + "; ".join(
                f"{' and '.join(names)} share one architecture and one timing (of {rep})"
                for rep, names in groups.items()
            )
            + ", so their speed-ups are one measurement, not independent ones.",
        ]
    tie = report.get("speed_tie")
    if tie and tie["noisy"]:
        lo, hi = tie["ci95"]
        lines += [
            "",
            f"**Speed measurement noisy:** the pruned and distilled models have the same architecture "
            f"but timed {tie['distilled_vs_pruned']:.2f}x apart [{lo:.2f}, {hi:.2f}]; read the speed-ups "
            "as uncertain by at least that much, or re-run with more `speed.timed_runs`.",
        ]
    return lines


def _millions(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.1f}"


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def task_metrics_markdown(report: dict) -> list[str]:
    """Every task metric of the three models with the changes, their intervals and retention."""
    models, changes = report["models"], report["vs_original"]
    lines = [
        "",
        "## Task metrics",
        "",
        "Value ± standard error; for the pruned and distilled models also the change vs the original "
        "with its paired bootstrap 95% interval over the same documents (**bold** = significant: the "
        "interval excludes zero), and the retention (for perplexity, lower is better and retention is "
        "original / model).",
        "",
        "| task | metric | original | pruned | Δ [95% CI] | retention | distilled | Δ [95% CI] | retention |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, metrics in models["original"]["metrics"].items():
        for metric, score in metrics.items():
            cells = [task, metric, _score(score)]
            for n in MODELS[1:]:
                c = changes[n]["tasks"][task][metric]
                cells += [
                    _score(models[n]["metrics"][task][metric]),
                    _delta(c),
                    _fmt(c["retention_pct"], ".1f") + ("%" if c["retention_pct"] is not None else ""),
                ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + _sensitivity_markdown(report)


def _sensitivity_markdown(report: dict) -> list[str]:
    """What the sample can detect, the mean retention, and how few documents it was."""
    changes = report["vs_original"]
    lines = []
    detectable = {
        t: m["acc"]["min_detectable"]
        for t, m in changes["distilled"]["tasks"].items()
        if "min_detectable" in m.get("acc", {})
    }
    if detectable:
        lines += [
            "",
            "Smallest accuracy change these documents detect (80% power, 5% level, paired): "
            + ", ".join(f"{t} {v:.3f}" for t, v in detectable.items())
            + '. A smaller true change can hide behind "not significant".',
        ]
    lines += [
        "",
        "Mean accuracy retention: "
        + ", ".join(f"{n} {_fmt(changes[n]['mean_acc_retention_pct'], '.1f')}%" for n in MODELS[1:]),
        "",
    ]
    if report.get("eval_limit") is not None:
        lines += [
            f"Evaluated on the first {report['eval_limit']} documents per task: small limits are noisy, "
            "read the standard errors before drawing conclusions.",
            "",
        ]
    return lines


def pruning_markdown(report: dict) -> list[str]:
    """Which layers went, and how the student was trained: objective, parameters, data, speed."""
    changes = report["vs_original"]
    lines = ["## Pruning and distillation", ""]
    prune = report.get("pruning", {})
    lines.append(
        f"- removed decoder layers: {prune.get('removed_layers')} "
        f"({changes['pruned']['params_removed']:,} parameters, {changes['pruned']['params_removed_pct']:.2f}%)"
    )
    kd = report.get("distillation", {})
    if kd:
        if "loss" in kd:
            lines.append(f"- distillation objective: {objective_text(kd['loss'])}")
        if kd.get("linear_map"):
            fit = kd["linear_map"]
            lines.append(
                f"- linear map in place of layers {fit['replaced']}, folded into layer {fit['layer']} "
                f"(no parameters added): fitted on {fit['tokens']:,} tokens, where it takes back "
                f"{100 * fit['explained']:.1f}% of the residual stream's squared error after the cut"
            )
        if "trainable_parameters" in kd and kd.get("optimizer_steps", 1):
            distill_cfg = report.get("config", {}).get("distill", {})
            what = (
                f"the last {distill_cfg['train_last_layers']} decoder layers and the final norm"
                if distill_cfg.get("train_last_layers")
                else "every decoder layer and the final norm"
            )
            if distill_cfg.get("replacement_layer"):
                what += ", with one new layer in the removed block's place"
            if distill_cfg.get("freeze_embeddings"):
                what += "; embedding and output head fixed"
            lines.append(
                f"- trained: {kd['trainable_parameters']:,} parameters ({what})"
                + (
                    f"; the first {kd['shared_trunk_layers']} layers run once for teacher and student"
                    if kd.get("shared_trunk_layers")
                    else ""
                )
            )
            if distill_cfg.get("corpus_mix"):
                lines.append(
                    "- data: " + ", ".join(f"{src} (weight {w:g})" for src, w in distill_cfg["corpus_mix"].items())
                )
        if "teacher" in kd:
            student = ("bfloat16 autocast" if kd.get("bf16_autocast") else "float32") + (
                ", gradient checkpointing" if kd.get("gradient_checkpointing") else ""
            )
            lines.append(
                f"- KD mode: teacher {kd['teacher']}; student {student}"
                + (f"; {kd['world_size']} data-parallel processes" if kd.get("world_size", 1) > 1 else "")
            )
            lines += precision_markdown(kd)
        if kd.get("losses"):
            lines.append(
                f"- distillation: {kd['optimizer_steps']} optimiser steps on {kd['num_samples']} samples, "
                f"{kd['train_tokens']:,} tokens in {kd['train_seconds']:.1f} s "
                f"({kd['train_tokens_per_s']:.1f} tokens/s); loss {kd['losses'][0]:.4f} → {kd['losses'][-1]:.4f}"
            )
        else:
            lines.append("- distillation: no optimiser step (distill.epochs=0)")
    for i, phase in enumerate(report.get("distillation_then", []), 1):
        changes = ", ".join(f"{k}={v}" for k, v in phase["settings"].items())
        lines.append(
            f"- then (phase {i + 1}, {changes}): {objective_text(phase['loss'])}; "
            f"{phase['trainable_parameters']:,} parameters trained, {phase['optimizer_steps']} optimiser steps on "
            f"{phase['num_samples']} samples, {phase['train_tokens']:,} tokens in {phase['train_seconds']:.1f} s"
            + (f"; loss {phase['losses'][0]:.4f} → {phase['losses'][-1]:.4f}" if phase.get("losses") else "")
        )
    return lines


def continuations_markdown(report: dict) -> list[str]:
    """Each model's continuation of the sample prompt."""
    models = report["models"]
    lines = ["", "## Continuations", ""]
    prompt = models["original"]["sample_prompt"]
    for n in MODELS:
        lines.append(f"- **{n}**: {prompt}**{models[n]['sample_continuation']}**")
    return lines


def figures_markdown(report: dict, figure_dir: Path | None = None) -> list[str]:
    """The figures as links beside the report, or inline from ``figure_dir``."""
    if not report.get("figures"):
        return []
    from tailor.report.plots import embed_markdown

    lines = ["", "## Figures", ""]
    for caption, name in report["figures"].items():
        lines += [embed_markdown(Path(figure_dir) / name, caption) if figure_dir else f"![{caption}]({name})", ""]
    return lines


def promotion_markdown(report: dict) -> list[str]:
    """The promotion gate's decision and its reasons, once it has run."""
    if not report.get("promotion"):
        return []
    d = report["promotion"]
    lines = [
        "",
        "## Promotion",
        "",
        f"Version {d['version']} vs {d['reference']}: **{'promoted' if d['promoted'] else 'not promoted'}**"
        + (f" (champion was v{d['previous_champion']})" if d.get("previous_champion") else ""),
        "",
    ]
    return lines + [f"- {r}" for r in d["reasons"]]


def stage_costs_markdown(report: dict) -> list[str]:
    """Compute seconds and peak memory of each stage."""
    if not report.get("stages"):
        return []
    lines = [
        "",
        "## Where the time went",
        "",
        "Compute seconds of each stage when it ran, and the process's peak resident memory by its end.",
        "",
        "| stage | seconds | peak RSS (GiB) |",
        "|---|---|---|",
    ]
    return lines + [
        f"| {k} | {v['seconds']:.1f} | {_fmt(v.get('peak_rss_gib'), '.2f')} |" for k, v in report["stages"].items()
    ]


def healing_markdown(report: dict) -> list[str]:
    """The healing section: distilled vs pruned per task and pooled, recovered share, perplexities."""
    healing = report.get("healing")
    if not healing or not healing.get("pooled"):
        return []
    metric = healing["metric"]
    lines = [
        "## Healing: what distillation recovered",
        "",
        f"Distilled − pruned {metric} with its paired bootstrap 95% interval, and the recovered share "
        "(distilled − pruned) / (original − pruned) with its interval: 0% = no healing, 100% = the original's "
        "quality back. The share is printed only where pruning's own damage is significant; elsewhere the "
        "sample cannot tell. Pooled weighs every task equally.",
        "",
        "| task | pruned − original [95% CI] | distilled − pruned [95% CI] | verdict "
        "| recovered share [95% CI] | docs |",
        "|---|---|---|---|---|---|",
    ]
    for task, r in [*healing["per_task"].items(), ("**pooled**", healing["pooled"])]:
        lines.append(
            f"| {task} | {_ci(-r['damage'], [-r['damage_ci95'][1], -r['damage_ci95'][0]])} | "
            f"{_ci(r['delta_vs_pruned'], r['delta_ci95'])} | {_verdict(r)} | {_share(r)} | {r['n']} |"
        )
    ppl = healing.get("perplexity")
    if ppl:
        verdict = (
            "**significantly worse**"
            if ppl["significant_harm"]
            else "better"
            if ppl["distilled_over_pruned_ci95"][1] < 1
            else "cannot tell"
        )
        share = (
            "cannot tell (pruning's perplexity increase is not significant)"
            if ppl["recovered_share"] is None
            else f"{ppl['recovered_share']:.0%} [{ppl['recovered_share_ci95'][0]:.0%}, "
            f"{ppl['recovered_share_ci95'][1]:.0%}]"
        )
        lo, hi = ppl["distilled_over_pruned_ci95"]
        lines += [
            "",
            f"{ppl['task']} perplexity: original {ppl['original']:.2f}, pruned {ppl['pruned']:.2f}, "
            f"distilled {ppl['distilled']:.2f} (distilled / pruned {ppl['distilled_over_pruned']:.3f} "
            f"[{lo:.3f}, {hi:.3f}]: {verdict}); recovered share {share}.",
        ]
    held = report.get("heldout_perplexity")
    if held and all(n in held for n in MODELS):
        lines += [
            "",
            "Held-out corpus perplexity (documents of the distillation corpus that training never saw): "
            + ", ".join(f"{n} {held[n]['perplexity']:.2f}" for n in MODELS)
            + f" ({held['original']['tokens']:,} tokens per model).",
        ]
    return lines + [""]


def _ci(value: float, ci: list[float]) -> str:
    return f"{value:+.4f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _verdict(r: dict) -> str:
    if r["significant_gain"]:
        return "better"
    if r["significant_harm"]:
        return "**worse**"
    return "cannot tell"


def _share(r: dict) -> str:
    if r["recovered_share"] is None:
        return "cannot tell (damage not significant)"
    lo, hi = r["recovered_share_ci95"]
    return f"{r['recovered_share']:.0%} [{lo:.0%}, {hi:.0%}]"


def _delta(change: dict) -> str:
    text = f"{change['delta']:+.4f}"
    if "paired_ci95" in change:
        low, high = change["paired_ci95"]
        text += f" [{low:+.3f}, {high:+.3f}]"
        if change["significant"]:
            text = f"**{text}**"
    return text


def load_scores(path: str | Path) -> dict:
    """Per-document scores and raw request answers written by the evaluation stage."""
    result = json.loads(Path(path).read_text())
    return {"items": result["items"], "requests": result.get("requests", {})}


def _score(score: dict) -> str:
    err = score.get("stderr")
    return f"{score['value']:.4f}" + (f" ± {err:.4f}" if err is not None else "")


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    write_file_atomically(json_path, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    write_file_atomically(md_path, lambda tmp: tmp.write_text(render_markdown(report)))
    return json_path, md_path


def objective_text(loss: dict) -> str:
    """What the student was trained to match, in words (a training record's ``loss``)."""
    objective = loss.get("objective")
    if objective == "weighted":
        return " + ".join(f"{part['weight']:g} × {objective_text(part)}" for part in loss["parts"])
    if objective == "hidden":
        return f"the teacher's final hidden state ({loss['hidden_loss']} per token, real tokens only)"
    if objective == "span":
        return (
            "the teacher's state entering the first layer kept after the removed block "
            f"({loss['hidden_loss']} per token, real tokens only)"
        )
    if objective == "topk_logits":
        return (
            f"the teacher's top-k logits at T={loss['temperature']} (forward KL over its top-k tokens and the rest, "
            "the student's logits at those tokens only), real tokens only"
        )
    if loss["book"]:
        return "the book's logit KD (batchmean KL over padded positions)"
    return f"logit KD, {loss['kind']} at T={loss['temperature']} scaled by T², alpha={loss['alpha']}, real tokens only"
