"""Interleaved timing: speed-ups with intervals over rounds, the tie check, and the gate's use of them."""

from __future__ import annotations

import pytest

from tailor.config.settings import PromotionConfig, SpeedConfig
from tailor.evaluate.speed import speedup_interval, time_interleaved
from tailor.registry.promotion import decide
from tailor.report.compare import speed_tie


def test_rounds_time_every_model_once_in_turn(tiny_tokenizer, tiny_model):
    cfg = SpeedConfig(prompts=("hello there",), max_new_tokens=3, warmup_runs=1, timed_runs=4)
    timing = time_interleaved({"a": (tiny_model, tiny_tokenizer), "b": (tiny_model, tiny_tokenizer)}, cfg)
    assert [len(t["run_times_s"]) for t in timing.values()] == [4, 4]
    assert all(t["tokens_per_s"] > 0 and t["new_tokens_per_run"] == 3 for t in timing.values())


def test_the_speedup_is_a_median_of_paired_rounds_with_an_interval():
    base = [2.0, 2.2, 4.0, 2.1, 2.0, 2.3, 2.1]  # the machine slowed down in round 3 for both
    fast = [1.0, 1.1, 2.0, 1.05, 1.0, 1.15, 1.05]
    s = speedup_interval(base, fast)
    assert s["median"] == pytest.approx(2.0) and s["ci95"] == pytest.approx([2.0, 2.0])
    assert s["rounds"] == 7


def test_two_models_of_one_architecture_that_do_not_tie_flag_the_measurement_noisy():
    same = {"run_times_s": [1.0, 1.1, 0.9, 1.0, 1.05]}
    assert not speed_tie({"pruned": same, "distilled": same})["noisy"]
    slower = {"run_times_s": [1.3, 1.4, 1.2, 1.35, 1.3]}
    tie = speed_tie({"pruned": same, "distilled": slower})
    assert tie["noisy"] and tie["ci95"][1] < 1


@pytest.mark.parametrize(
    "low, high, passes, word",
    [(1.06, 1.2, True, "at least"), (0.9, 1.02, False, "below"), (1.0, 1.1, False, "inconclusive")],
)
def test_the_gate_judges_speed_by_its_interval(low, high, passes, word):
    tags = {
        "tailor.eval_signature": "s",
        "tailor.mean_acc_retention_pct": "100",
        "tailor.speedup": "1.08",
        "tailor.speedup_ci95_low": str(low),
        "tailor.speedup_ci95_high": str(high),
    }
    ok, _, reasons = decide(tags, None, PromotionConfig(min_speedup=1.05))
    assert ok == passes
    assert any("speed-up 1.080x" in r and word in r for r in reasons)
