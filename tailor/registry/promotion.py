"""The registry promotion gate: move ``champion`` to a new version only when it is good enough.

Every registered version carries its evaluation as tags (``tailor.*``, set at
registration). The gate compares the challenger with the current champion, or with
the original model (the challenger's own run) when there is none:

* distillation did not make the model significantly worse than the pruned one on any
  task (paired 95% interval, ``tailor.harmed_vs_pruned``);
* mean accuracy retention vs the original >= ``min_mean_retention_pct``;
* generation speed-up vs the original >= ``min_speedup``: the lower bound of its bootstrap
  interval over interleaved timing rounds (inconclusive when the interval holds it);
* no task's accuracy more than ``max_task_drop`` below the reference's: against the original,
  the lower bound of the paired 95% interval of the change must clear -``max_task_drop``
  (an interval that holds it is "inconclusive: not promoted", with the documents that would
  decide it); against a champion, the point estimates (their documents are not paired here);
* against a champion: evaluated the same way (tasks, limit, data), and a mean
  accuracy no lower than the champion's, so the alias never moves to a worse model.

A promotion is one decision, whatever retries or other promoters do. ``promote`` holds the
registered model's promotion lock, kept in the registry itself (``tailor.store.locks``), so
promoters that share only the registry (two work folders, two Prefect servers, two machines on
one ``mlflow server``) take turns. It writes the decision on the version first (one
``tailor.promotion.record`` tag, then the readable ``tailor.promotion.*`` tags) and moves the
alias last, after re-reading it: when it no longer points where the decision saw it, the
challenger is judged again. A call that finds its own decision recorded (same version, same
champion, same tags, gate and ``force``) completes that one and returns it, so a retry after a
failed write reports the same decision, not "already champion".
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tailor.config.settings import PromotionConfig, TailorError
from tailor.report.compare import objective_text
from tailor.store.checkpoint import stable_hash
from tailor.store.locks import registry_lock

# Accuracies are ratios of counts; their differences carry float rounding of this order.
_ROUNDING = 1e-9


class PromotionError(TailorError, ValueError):
    """The version to promote does not exist or carries no evaluation."""


# The decision in one tag: what a retry reads to know its own decision. Written before the readable tags.
RECORD_TAG = "tailor.promotion.record"
# Judgements of one call when the alias keeps moving under it (only a writer that skips the lock can).
_ATTEMPTS = 3


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Decision:
    version: str
    promoted: bool
    reference: str
    reasons: list[str] = field(default_factory=list)
    previous_champion: str | None = None
    time: str = field(default_factory=_now)
    # Fingerprint of what the decision was computed from: both versions' tags, the gate, force.
    inputs: str = ""

    def as_tags(self) -> dict[str, str]:
        return {
            "tailor.promotion.decision": "promoted" if self.promoted else "rejected",
            "tailor.promotion.reference": self.reference,
            "tailor.promotion.reasons": "; ".join(self.reasons)[:4900],
            "tailor.promotion.time": self.time,
        }

    def record(self) -> str:
        return json.dumps(
            {
                "decision": "promoted" if self.promoted else "rejected",
                "previous_champion": self.previous_champion,
                "reference": self.reference,
                "inputs": self.inputs,
                "time": self.time,
            }
        )


def evaluation_tags(report: dict, eval_signature: str) -> dict[str, str]:
    """Tags that let a later gate judge this version without its run: per-task accuracy of
    the distilled and original models, mean retention, speed-up, and how it was evaluated."""
    distilled, original = report["models"]["distilled"], report["models"]["original"]
    change = report["vs_original"]["distilled"]
    tags = {
        "tailor.eval_signature": eval_signature,
        "tailor.speedup": str(change["speedup"]),
        # Empty when distillation hurt nowhere (significantly, vs the pruned model).
        "tailor.harmed_vs_pruned": "; ".join((report.get("healing") or {}).get("harmed", [])),
    }
    if change.get("speedup_ci95"):
        tags["tailor.speedup_ci95_low"], tags["tailor.speedup_ci95_high"] = (str(x) for x in change["speedup_ci95"])
    if change["mean_acc_retention_pct"] is not None:  # None when no task reports accuracy
        tags["tailor.mean_acc_retention_pct"] = str(change["mean_acc_retention_pct"])
    stopping = (report.get("evaluation") or {}).get("stopping", {})
    for task, metrics in distilled["metrics"].items():
        if "acc" in metrics:
            tags[f"tailor.acc.{task}"] = str(metrics["acc"]["value"])
            tags[f"tailor.original_acc.{task}"] = str(original["metrics"][task]["acc"]["value"])
            paired = change["tasks"][task]["acc"]
            stop = stopping.get(task, {})
            if stop.get("interval"):
                # Scored until decided: the stop rule's interval (its level spends the error rate
                # over the looks) is the one whose error rate holds, not a plain 95% one. An
                # undecided stop adds the rule's estimate of the documents that would decide it
                # (at the last look's boundary: an early look's wider interval would overstate it).
                needed = [stop["documents_to_decide"]] if stop.get("documents_to_decide") else []
                tags[f"tailor.acc_delta.{task}"] = ",".join(
                    str(x) for x in (stop["delta"], *stop["interval"], stop["documents"], *needed)
                )
            elif "paired_ci95" in paired:
                tags[f"tailor.acc_delta.{task}"] = ",".join(
                    str(x) for x in (paired["delta"], *paired["paired_ci95"], paired["n"])
                )
    return tags


MODEL_DESCRIPTION = (
    "A depth-pruned model healed by knowledge distillation from its original, made by llm-tailor. "
    "Each version's description says what was removed and how it was healed; its tailor.* tags "
    "hold its evaluation; the champion alias marks the version the promotion gate approved."
)


def version_description(report: dict, report_md: str) -> str:
    """What a registry user needs to know about a version, from its report: where it came
    from, what was removed and how it was healed, its headline figures with intervals."""
    cfg, change = report["config"], report["vs_original"]["distilled"]
    model, distill = cfg["model"], cfg["distill"]
    source = model["name_or_path"] if model["source"] == "hf" else f"{model['source']} model"
    kd = report["distillation"]
    corpus = distill["corpus_mix"] if cfg["data"]["mode"] == "offline" else distill["corpus"]
    speed = f"{change['speedup']:.2f}x"
    if change.get("speedup_ci95"):
        speed += " [{:.2f}, {:.2f}]".format(*change["speedup_ci95"])
    lines = [
        f"Depth-pruned from {source}: decoder layers {report['pruning']['removed_layers']} removed "
        f"({change['params_removed_pct']:.1f}% of the parameters), then distilled from the original: "
        f"{kd['optimizer_steps']} optimiser steps on {kd['num_samples']} samples of {distill['seq_len']} tokens, "
        f"lr {distill['learning_rate']}, corpus {corpus}; trained to match {objective_text(kd['loss'])}.",
        *(
            f"Then phase {i}: {', '.join(f'{k}={v}' for k, v in phase['settings'].items())}: "
            f"{phase['optimizer_steps']} optimiser steps on {phase['num_samples']} samples."
            for i, phase in enumerate(report.get("distillation_then", []), 2)
        ),
        f"Evaluated on {report['eval_limit'] or 'all'} documents per task. "
        f"Generation speed-up vs the original: {speed}.",
    ]
    if change["mean_acc_retention_pct"] is not None:
        lines.append(f"Mean accuracy retention vs the original: {change['mean_acc_retention_pct']:.1f}%.")
    pooled = (report.get("healing") or {}).get("pooled")
    if pooled:
        lo, hi = pooled["delta_ci95"]
        lines.append(
            f"Distilled - pruned accuracy, pooled over tasks: {pooled['delta_vs_pruned']:+.3f} "
            f"[{lo:+.3f}, {hi:+.3f}] (paired 95% interval)."
        )
    lines.append(f"Report: {report_md}")
    return "\n\n".join(lines)


def decide(
    challenger: dict[str, str],
    champion: dict[str, str] | None,
    gate: PromotionConfig,
    champion_version: str | None = None,
) -> tuple[bool, str, list[str]]:
    """(passes, reference, reasons) from two versions' tags."""
    reasons: list[str] = []
    ok = True
    retention = float(challenger["tailor.mean_acc_retention_pct"])
    checks = [
        (
            retention >= gate.min_mean_retention_pct,
            f"mean retention {retention:.1f}% {'>=' if retention >= gate.min_mean_retention_pct else '<'} "
            f"{gate.min_mean_retention_pct:.1f}%",
        ),
        _speed_check(challenger, gate.min_speedup),
    ]
    harmed = challenger.get("tailor.harmed_vs_pruned", "")
    checks.append(
        (
            not harmed,
            f"distillation significantly worse than the pruned model on: {harmed}"
            if harmed
            else "distillation not significantly worse than the pruned model on any task",
        )
    )
    acc = _task_values(challenger, "tailor.acc.")
    if champion is not None and champion.get("tailor.eval_signature") != challenger["tailor.eval_signature"]:
        reference = f"champion v{champion_version}"
        checks.append(
            (
                False,
                f"{reference} was evaluated differently (tasks, limit or data); "
                "not comparable, promote by hand with --force after checking",
            )
        )
    else:
        if champion is not None:
            reference, ref_acc = f"champion v{champion_version}", _task_values(champion, "tailor.acc.")
            mean_new, mean_old = _mean(acc.values()), _mean(ref_acc.values())
            checks.append(
                (
                    mean_new >= mean_old,
                    f"mean accuracy {mean_new:.4f} "
                    f"{'>=' if mean_new >= mean_old else '<'} {reference}'s {mean_old:.4f}",
                )
            )
        else:
            reference, ref_acc = "original", _task_values(challenger, "tailor.original_acc.")
        intervals = _task_intervals(challenger) if champion is None else {}
        for task, value in sorted(acc.items()):
            if task in intervals:  # paired interval vs the original on the same documents
                checks.append(_non_inferior(task, *intervals[task], gate.max_task_drop))
                continue
            drop = ref_acc.get(task, value) - value
            # A drop equal to the threshold passes: 0.40 - 0.35 is 0.05000000000000004 in floats.
            within = drop <= gate.max_task_drop + _ROUNDING
            checks.append(
                (
                    within,
                    f"{task} accuracy {value:.4f} vs {reference} {ref_acc.get(task, value):.4f}: "
                    f"drop {drop:+.4f} {'<=' if within else '>'} {gate.max_task_drop}",
                )
            )
    for passed, reason in checks:
        ok &= passed
        reasons.append(("pass: " if passed else "FAIL: ") + reason)
    return ok, reference, reasons


def _task_intervals(tags: dict[str, str]) -> dict[str, tuple]:
    """task -> (accuracy change vs the original, its paired interval, documents, and the documents the
    stop rule estimated would decide it or None), from the tags."""
    out = {}
    for key, value in tags.items():
        if key.startswith("tailor.acc_delta."):
            task = key.removeprefix("tailor.acc_delta.")
            delta, low, high, n, *needed = value.split(",")
            out[task] = (float(delta), float(low), float(high), int(n), int(needed[0]) if needed else None)
    return out


def _non_inferior(
    task: str, delta: float, low: float, high: float, n: int, needed: int | None, margin: float
) -> tuple[bool, str]:
    """Shown not worse than the original by more than ``margin``: the interval's lower bound
    clears -margin. Undecided intervals say how many documents would decide them (the stop rule's
    estimate where it made one)."""
    shown = f"{task} accuracy change {delta:+.4f} [{low:+.3f}, {high:+.3f}] over {n} documents"
    if low >= -margin - _ROUNDING:
        return True, f"{shown}: shown within -{margin}"
    if high < -margin:
        return False, f"{shown}: worse than -{margin}"
    half, distance = (high - low) / 2, abs(delta + margin)
    if distance <= 1e-9:
        more = "the change sits on the margin"
    else:
        more = f"about {needed or math.ceil(n * (half / distance) ** 2):,} documents would decide it"
    return False, f"{shown}: inconclusive, the interval holds -{margin} (not promoted; {more})"


def _speed_check(challenger: dict[str, str], min_speedup: float) -> tuple[bool, str]:
    """The speed-up passes when its interval's lower bound clears the threshold (the point
    estimate alone for versions registered without an interval)."""
    speedup = float(challenger["tailor.speedup"])
    if "tailor.speedup_ci95_low" not in challenger:
        passed = speedup >= min_speedup
        return passed, f"speed-up {speedup:.3f}x {'>=' if passed else '<'} {min_speedup:.3f}x"
    low, high = float(challenger["tailor.speedup_ci95_low"]), float(challenger["tailor.speedup_ci95_high"])
    shown = f"speed-up {speedup:.3f}x [{low:.3f}, {high:.3f}]"
    if low >= min_speedup:
        return True, f"{shown}: at least {min_speedup:.3f}x"
    if high < min_speedup:
        return False, f"{shown}: below {min_speedup:.3f}x"
    return False, f"{shown}: inconclusive, the interval holds {min_speedup:.3f}x (not promoted; more speed.timed_runs)"


def promote(
    client: MlflowClient,
    model_name: str,
    version: str,
    gate: PromotionConfig,
    *,
    force: bool = False,
    lease_s: float = 120.0,
    lock_timeout_s: float = 600.0,
) -> Decision:
    """Run the gate on ``version`` and move the champion alias when it passes (or ``force``).

    Holds the registry's promotion lock of ``model_name`` (waiting up to ``lock_timeout_s``);
    writes the decision on the version, then moves the alias if it still points at the champion
    the decision was made against. Calling it again after a failure part-way returns the same
    decision (and finishes its writes) while the champion has not moved.
    """
    version = str(version)
    _version_tags(client, model_name, version)  # a missing version fails before any lock
    with registry_lock(client, model_name, lease_s=lease_s, timeout_s=lock_timeout_s) as lease:
        for _ in range(_ATTEMPTS):
            challenger = _version_tags(client, model_name, version)
            current = _alias_version(client, model_name, gate.champion_alias)
            decision = _recorded_decision(client, model_name, version, challenger, current, gate, force)
            if decision is None:
                if current == version:
                    # Champion by another decision, or by hand: the version's record stays as it is.
                    return Decision(version, False, f"champion v{current}", [f"already {gate.champion_alias}"], current)
                decision = _judge(client, model_name, version, challenger, current, gate, force)
                lease.check(verify=False)
                client.set_model_version_tag(model_name, version, RECORD_TAG, decision.record())
            for key, value in decision.as_tags().items():
                lease.check(verify=False)
                client.set_model_version_tag(model_name, version, key, value)
            if not decision.promoted or current == version:
                return decision
            lease.check()  # still ours, with time left for the move
            # Compare-and-set: move the alias only from the champion the decision was made against.
            if _alias_version(client, model_name, gate.champion_alias) == current:
                client.set_registered_model_alias(model_name, gate.champion_alias, version)
                return decision
    raise PromotionError(
        f"alias {gate.champion_alias!r} of {model_name!r} moved {_ATTEMPTS} times while version {version} was "
        "being judged (by something that does not take the promotion lock); not promoting"
    )


def _judge(
    client: MlflowClient,
    model_name: str,
    version: str,
    challenger: dict[str, str],
    current: str | None,
    gate: PromotionConfig,
    force: bool,
) -> Decision:
    """The gate's decision on ``challenger`` against the version ``current`` (None: no champion)."""
    judged = "tailor.mean_acc_retention_pct" in challenger
    if not judged and not force:
        raise PromotionError(
            f"version {version} of {model_name!r} carries no llm-tailor accuracy tags "
            "(registered outside a tailor run, or none of its tasks reports accuracy); "
            "promote it with --force"
        )
    champion = _version_tags(client, model_name, current) if current else None
    inputs = stable_hash(
        version, _gate_tags(challenger), current, _gate_tags(champion or {}), gate.model_dump(mode="json"), force
    )
    if not judged:
        return Decision(version, True, "none", ["forced by hand: no evaluation tags to check"], current, inputs=inputs)
    passed, reference, reasons = decide(challenger, champion, gate, current)
    if force and not passed:
        reasons.append("forced by hand: thresholds overridden")
    return Decision(version, passed or force, reference, reasons, current, inputs=inputs)


def _recorded_decision(
    client: MlflowClient,
    model_name: str,
    version: str,
    challenger: dict[str, str],
    current: str | None,
    gate: PromotionConfig,
    force: bool,
) -> Decision | None:
    """The decision recorded on the version when it is this call's own: made from the same tags,
    gate and ``force`` against the champion that is still in place (or, once promoted, replaced by
    this version). None when there is none, or the champion or an input has changed since."""
    try:
        record = json.loads(challenger[RECORD_TAG])
        previous, promoted = record["previous_champion"], record["decision"] == "promoted"
    except (KeyError, ValueError, TypeError):
        return None
    if current != previous and not (promoted and current == version):
        return None
    try:
        decision = _judge(client, model_name, version, challenger, previous, gate, force)
    except PromotionError:  # the recorded champion is gone, or the version lost its tags
        return None
    if decision.inputs != record.get("inputs") or decision.promoted != promoted:
        return None
    decision.time = record.get("time") or decision.time
    return decision


def _gate_tags(tags: dict[str, str]) -> dict[str, str]:
    """The tags a decision reads: llm-tailor's, without the decisions written on the version."""
    return {k: v for k, v in tags.items() if k.startswith("tailor.") and not k.startswith("tailor.promotion.")}


def check_version(client: MlflowClient, model_name: str, version: str) -> None:
    """Clear error when the version does not exist (before anything else runs)."""
    _version_tags(client, model_name, version)


def _version_tags(client: MlflowClient, model_name: str, version: str) -> dict[str, str]:
    try:
        return dict(client.get_model_version(model_name, str(version)).tags)
    except MlflowException:
        existing = _existing_versions(client, model_name)
        raise PromotionError(
            f"version {version} of registered model {model_name!r} does not exist; "
            f"existing versions: {', '.join(existing) or 'none'}"
        ) from None


def _existing_versions(client: MlflowClient, model_name: str) -> list[str]:
    try:
        return sorted((str(v.version) for v in client.search_model_versions(f"name='{model_name}'")), key=int)
    except MlflowException:
        return []


def _alias_version(client: MlflowClient, model_name: str, alias: str) -> str | None:
    """The version holding ``alias``, None only when the registry says there is none.

    Fails closed: any other registry error stops the promotion, so an unreadable champion is
    never taken for "no champion" (which would judge the challenger against the original only).
    """
    try:
        return str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
            return None
        raise PromotionError(
            f"cannot read alias {alias!r} of {model_name!r} from the registry ({exc}); not promoting"
        ) from exc


def _task_values(tags: dict[str, str], prefix: str) -> dict[str, float]:
    return {k.removeprefix(prefix): float(v) for k, v in tags.items() if k.startswith(prefix)}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
