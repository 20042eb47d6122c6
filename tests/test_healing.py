"""Recovered share and its paired intervals, the harm check, and what the gate and report do with it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tailor.config.settings import PromotionConfig
from tailor.registry.promotion import decide
from tailor.report.compare import build_report, render_markdown
from tailor.report.healing import healing_summary, perplexity_recovery, recovery


def _items(correct: list[int]) -> dict[str, dict[str, float]]:
    return {str(i): {"acc": float(c)} for i, c in enumerate(correct)}


def _evals(original: list[int], pruned: list[int], distilled: list[int], task: str = "arc_easy") -> dict:
    return {
        name: {"metrics": {task: {"acc": {"value": float(np.mean(c)), "stderr": 0.01}}}, "items": {task: _items(c)}}
        for name, c in (("original", original), ("pruned", pruned), ("distilled", distilled))
    }


def test_recovery_of_a_clear_healing_is_significant_with_the_right_share():
    n = 400
    original = [1] * n
    pruned = [0] * 200 + [1] * 200  # damage 0.5
    distilled = [0] * 100 + [1] * 300  # half of it back
    r = recovery([np.array([original, pruned, distilled], dtype=float)])
    assert r["damage"] == pytest.approx(0.5) and r["delta_vs_pruned"] == pytest.approx(0.25)
    assert r["recovered_share"] == pytest.approx(0.5)
    assert r["significant_gain"] and not r["significant_harm"] and r["damage_significant"]
    low, high = r["recovered_share_ci95"]
    assert 0.35 < low < 0.5 < high < 0.65


def test_an_interval_that_touches_zero_is_not_a_significant_gain():
    # Four tasks whose pooled bootstrap lower end is exactly zero; summed in float it came out
    # as +5.6e-17 and was reported as a significant gain before the bounds were rounded.
    rng = np.random.default_rng(84)
    groups = []
    for _ in range(4):
        original, pruned = (rng.random(200) < 0.6).astype(float), (rng.random(200) < 0.4).astype(float)
        distilled = pruned.copy()
        flip = rng.random(200) < 0.15
        distilled[flip] = 1 - distilled[flip]
        groups.append(np.array([original, pruned, distilled]))
    r = recovery(groups)
    assert r["delta_ci95"][0] == 0.0 and r["delta_vs_pruned"] > 0
    assert not r["significant_gain"] and not r["significant_harm"]


def test_share_is_withheld_when_pruning_did_no_significant_damage():
    same = [1, 0] * 50
    r = recovery([np.array([same, same, same], dtype=float)])
    assert r["recovered_share"] is None and r["recovered_share_ci95"] is None
    assert r["delta_ci95"] == [0.0, 0.0] and not r["significant_gain"] and not r["significant_harm"]


def test_pooled_weighs_tasks_equally_and_harm_is_named():
    big = _evals([1] * 300, [1] * 150 + [0] * 150, [1] * 200 + [0] * 100, "hellaswag")
    small = _evals([1] * 100, [1] * 100, [0] * 30 + [1] * 70, "arc_easy")
    evals = {
        m: {"metrics": {**big[m]["metrics"], **small[m]["metrics"]}, "items": {**big[m]["items"], **small[m]["items"]}}
        for m in big
    }
    summary = healing_summary(evals)
    assert summary["pooled"]["delta_vs_pruned"] == pytest.approx((50 / 300 - 0.3) / 2)
    assert summary["per_task"]["arc_easy"]["significant_harm"]
    assert summary["harmed"] == ["arc_easy acc"]


def test_perplexity_recovery_from_per_document_loglikelihoods():
    rng = np.random.default_rng(0)
    base = rng.normal(-3.0, 0.5, 500)
    ll = np.stack([base, base - 1.0, base - 0.3])  # pruned worse, distilled most of the way back
    r = perplexity_recovery(ll)
    assert r["original"] == pytest.approx(math.exp(-base.mean()))
    assert r["pruned"] == pytest.approx(r["original"] * math.e)
    assert r["recovered_share"] == pytest.approx((math.e - math.exp(0.3)) / (math.e - 1))
    assert not r["significant_harm"] and r["distilled_over_pruned_ci95"][1] < 1
    assert perplexity_recovery(np.stack([base, base, base - 0.5]))["significant_harm"]


def _profile():
    return {
        "params": 10,
        "layers": 2,
        "checkpoint_bytes": 40,
        "gen_time_mean_s": 1.0,
        "gen_time_std_s": 0.1,
        "tokens_per_s": 10.0,
        "sample_prompt": "p",
        "sample_continuation": " c",
    }


def test_a_harmful_distillation_is_flagged_at_the_top_of_the_report_and_refused_by_the_gate():
    from tailor.registry.promotion import evaluation_tags

    evals = _evals([1] * 200, [1] * 150 + [0] * 50, [1] * 100 + [0] * 100)
    report = build_report({n: _profile() for n in evals}, evals, {"pruning": {"removed_layers": [1]}})
    assert report["healing"]["harmed"] == ["arc_easy acc"]
    md = render_markdown(report)
    assert md.splitlines()[2].startswith("> **Warning: distillation made the model significantly worse")
    assert "## Healing" in md and "**worse**" in md
    tags = evaluation_tags(report, "sig")
    assert tags["tailor.harmed_vs_pruned"] == "arc_easy acc"
    passed, _, reasons = decide(
        {**tags, "tailor.speedup": "2.0", "tailor.mean_acc_retention_pct": "100"},
        None,
        PromotionConfig(max_task_drop=1.0, min_mean_retention_pct=0),
    )
    assert not passed
    assert "FAIL: distillation significantly worse than the pruned model on: arc_easy acc" in reasons
