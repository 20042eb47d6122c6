"""The report's account of how the models were evaluated: documents per task, why scoring
stopped, and which layers the models shared."""

from __future__ import annotations

REASONS = {
    "limit": "scored to eval.limit",
    "within": "shown within the margin",
    "beyond": "shown beyond the margin",
    "cap": "undecided at eval.limit",
    "futile": "stopped for futility",
}


def evaluation_markdown(report: dict) -> list[str]:
    """Per task: documents used and why scoring stopped (with the stop rule's interval and, at the
    cap, the documents that would decide it); the layers each model shared with the original."""
    evaluation = report.get("evaluation")
    if not evaluation:
        return []
    lines = ["", "## Evaluation", ""]
    if evaluation.get("sequential"):
        margin = report["config"]["promotion"]["max_task_drop"]
        lines += [
            f"Scored in blocks of {report['config']['eval']['sequential_block']} documents until the gate's question "
            f"(distilled accuracy within {margin} of the original's?) was answered for each task, at most "
            f"{report['eval_limit']} documents (group-sequential rule, docs/evaluation.md).",
            "",
            "| task | documents | stopped because | distilled - original [interval] | level |",
            "|---|---|---|---|---|",
        ]
        for task, stop in evaluation["stopping"].items():
            interval = level = ""
            if stop.get("interval"):
                interval = f"{stop['delta']:+.4f} [{stop['interval'][0]:+.3f}, {stop['interval'][1]:+.3f}]"
                level = f"{stop['level']:.2%}"
            reason = REASONS.get(stop["reason"], stop["reason"])
            if stop["reason"] == "futile":
                reason += f" (the cap would decide it with probability {stop['conditional_power']:.0%} at this trend)"
            if stop["reason"] in ("cap", "futile"):
                needed = stop.get("documents_to_decide")
                reason += f"; about {needed:,} documents would decide it" if needed else "; it sits on the margin"
            lines.append(f"| {task} | {stop['documents']} | {reason} | {interval} | {level} |")
    else:
        documents = {task: stop["documents"] for task, stop in evaluation["stopping"].items()}
        lines.append("Documents per task: " + ", ".join(f"{t} {n}" for t, n in documents.items()) + ".")
    shared = {name: depth for name, depth in evaluation.get("trunk_depths", {}).items() if depth}
    if shared:
        lines += [
            "",
            "Evaluated together: "
            + ", ".join(f"{name} shared its first {depth} layers" for name, depth in shared.items())
            + " with the deepest model scored beside it, usually the original (checked on the weights; those layers"
            " ran once for both).",
        ]
    scored = evaluation.get("scored_requests", {})
    reused = [name for name, n in scored.items() if n == 0]
    if reused:
        lines += ["", f"Answers reused from earlier runs (not scored again): {', '.join(reused)}."]
    return lines
