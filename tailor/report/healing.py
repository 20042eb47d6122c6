"""How much of pruning's damage distillation recovered, with paired bootstrap intervals.

Every interval resamples documents, keeping each document's three scores (original,
pruned, distilled) together, so the noise of which documents were drawn cancels out of
the differences. The pooled figures weigh every task equally: each bootstrap round
resamples every task's documents and averages the per-task differences.

recovered share = (distilled - pruned) / (original - pruned): 0 = no healing, 1 = the
original's quality back. It is only defined when pruning's damage is significant: with
a damage interval that reaches zero the ratio's interval is unbounded, and the report
says "cannot tell" instead of printing it.
"""

from __future__ import annotations

import numpy as np

from tailor.common.stats import doc_order, percentile_interval

LEVEL = 0.95
ITERS = 2000


def _aligned(evals: dict[str, dict], task: str, metric: str) -> np.ndarray | None:
    """[3, docs] scores of original, pruned, distilled on the documents all three scored."""
    items = [evals[m].get("items", {}).get(task) for m in ("original", "pruned", "distilled")]
    if not all(items):
        return None
    shared = sorted(set.intersection(*(set(k for k, v in i.items() if metric in v) for i in items)), key=doc_order)
    if not shared:
        return None
    return np.array([[i[k][metric] for k in shared] for i in items], dtype=np.float64)


def _interval(samples: np.ndarray) -> list[float]:
    return list(percentile_interval(samples, LEVEL))


def _bootstrap_means(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """[ITERS, 3]: per round, the task-averaged means of original, pruned and distilled."""
    total = np.zeros((ITERS, 3))
    for scores in groups:
        n = scores.shape[1]
        idx = rng.integers(0, n, size=(ITERS, n))
        total += np.stack([scores[m][idx].mean(axis=1) for m in range(3)], axis=1)
    return total / len(groups)


def recovery(groups: list[np.ndarray], seed: int = 0) -> dict:
    """Change vs the pruned model, pruning's damage and the recovered share, with 95% intervals."""
    means = np.mean([g.mean(axis=1) for g in groups], axis=0)  # original, pruned, distilled
    boot = _bootstrap_means(groups, np.random.default_rng(seed))
    delta, damage = means[2] - means[1], means[0] - means[1]
    delta_ci = _interval(boot[:, 2] - boot[:, 1])
    damage_ci = _interval(boot[:, 0] - boot[:, 1])
    share_defined = damage_ci[0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (boot[:, 2] - boot[:, 1]) / (boot[:, 0] - boot[:, 1])
    return {
        "delta_vs_pruned": float(delta),
        "delta_ci95": delta_ci,
        "significant_gain": delta_ci[0] > 0,
        "significant_harm": delta_ci[1] < 0,
        "damage": float(damage),
        "damage_ci95": damage_ci,
        "damage_significant": share_defined,
        "recovered_share": float(delta / damage) if share_defined else None,
        "recovered_share_ci95": _interval(shares) if share_defined else None,
        "n": int(sum(g.shape[1] for g in groups)),
    }


def lambada_loglikelihoods(evals: dict[str, dict], task: str = "lambada_openai") -> np.ndarray | None:
    """[3, docs] log-likelihood of each document's target word (from the stored requests)."""
    rows = []
    for m in ("original", "pruned", "distilled"):
        requests = evals[m].get("requests", {}).get(task)
        doc_ids = list(evals[m].get("items", {}).get(task, {}))
        if not requests or len(doc_ids) != len(requests):
            return None
        rows.append(dict(zip(doc_ids, (r[0][0] for r in requests))))
    shared = sorted(set(rows[0]) & set(rows[1]) & set(rows[2]), key=doc_order)
    return np.array([[r[k] for k in shared] for r in rows], dtype=np.float64) if shared else None


def perplexity_recovery(ll: np.ndarray, seed: int = 0) -> dict:
    """Perplexity (exp of the mean negative log-likelihood) of the three models, the share of the
    pruning's perplexity increase that distillation took back, and distilled / pruned with intervals."""
    ppl = np.exp(-ll.mean(axis=1))
    n = ll.shape[1]
    idx = np.random.default_rng(seed).integers(0, n, size=(ITERS, n))
    boot = np.exp(-np.stack([ll[m][idx].mean(axis=1) for m in range(3)], axis=1))
    damage_ci = _interval(boot[:, 1] - boot[:, 0])
    defined = damage_ci[0] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = (boot[:, 1] - boot[:, 2]) / (boot[:, 1] - boot[:, 0])
    ratio_ci = _interval(boot[:, 2] / boot[:, 1])
    return {
        "original": float(ppl[0]),
        "pruned": float(ppl[1]),
        "distilled": float(ppl[2]),
        "recovered_share": float((ppl[1] - ppl[2]) / (ppl[1] - ppl[0])) if defined else None,
        "recovered_share_ci95": _interval(shares) if defined else None,
        "distilled_over_pruned": float(ppl[2] / ppl[1]),
        "distilled_over_pruned_ci95": ratio_ci,
        "significant_harm": ratio_ci[0] > 1,
        "n": int(n),
    }


def healing_summary(evals: dict[str, dict], metric: str = "acc") -> dict:
    """report.json's ``healing``: per task and pooled recovery of ``metric``, lambada perplexity,
    and the tasks on which the distilled model is significantly worse than the pruned one."""
    per_task = {}
    for task in evals["original"].get("items", {}):
        scores = _aligned(evals, task, metric)
        if scores is not None:
            per_task[task] = recovery([scores])
    groups = [g for g in (_aligned(evals, t, metric) for t in per_task) if g is not None]
    summary = {
        "metric": metric,
        "per_task": per_task,
        "pooled": recovery(groups) if groups else None,
        "perplexity": None,
    }
    ll = lambada_loglikelihoods(evals)
    if ll is not None:
        summary["perplexity"] = {"task": "lambada_openai", **perplexity_recovery(ll)}
    summary["harmed"] = harmed_metrics(summary)
    return summary


def harmed_metrics(summary: dict) -> list[str]:
    """'task metric' of every measure on which the distilled model is significantly worse than the pruned one."""
    harmed = [f"{task} {summary['metric']}" for task, r in summary["per_task"].items() if r["significant_harm"]]
    ppl = summary.get("perplexity")
    if ppl and ppl["significant_harm"]:
        harmed.append(f"{ppl['task']} perplexity")
    return harmed
