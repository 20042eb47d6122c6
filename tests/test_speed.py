"""Interleaved timing: one timing per architecture, multiply-adds per token, speed-ups with
intervals over rounds, the tie check, and the gate's use of them."""

from __future__ import annotations

import copy

import pytest
import torch

from tailor.config.settings import PromotionConfig, SpeedConfig
from tailor.evaluate import speed
from tailor.evaluate.speed import (
    architecture_signature,
    macs_per_token,
    profile_checkpoints,
    speedup_interval,
    time_by_architecture,
    time_interleaved,
)
from tailor.models.tiny import build_tiny_gemma3
from tailor.prune.pruning import prune_layers
from tailor.registry.promotion import decide
from tailor.report.compare import speed_tie
from tailor.store.checkpoint import save_model, write_checkpoint

TINY_SPEED = SpeedConfig(prompts=("hello there",), max_new_tokens=2, warmup_runs=1, timed_runs=3)


def _retrained(model, seed: int):
    """The same architecture with other weights, as distillation leaves a pruned model."""
    other = copy.deepcopy(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return other


@pytest.fixture()
def three_models(tiny_model, tiny_tokenizer):
    """original (6 layers), pruned (5) and distilled (5, other weights)."""
    pruned = prune_layers(copy.deepcopy(tiny_model), [5])
    return {
        "original": (tiny_model, tiny_tokenizer),
        "pruned": (pruned, tiny_tokenizer),
        "distilled": (_retrained(pruned, seed=1), tiny_tokenizer),
    }


def test_rounds_time_every_model_once_in_turn(tiny_tokenizer, tiny_model):
    cfg = SpeedConfig(prompts=("hello there",), max_new_tokens=3, warmup_runs=1, timed_runs=4)
    timing = time_interleaved({"a": (tiny_model, tiny_tokenizer), "b": (tiny_model, tiny_tokenizer)}, cfg)
    assert [len(t["run_times_s"]) for t in timing.values()] == [4, 4]
    assert all(t["tokens_per_s"] > 0 and t["new_tokens_per_run"] == 3 for t in timing.values())


def test_models_of_one_architecture_are_timed_once_and_share_the_figures(three_models, monkeypatch):
    timed = []
    real = speed._one_run

    def counting(model, tokenizer, cfg):
        timed.append(next(n for n, (m, _) in three_models.items() if m is model))
        return real(model, tokenizer, cfg)

    monkeypatch.setattr(speed, "_one_run", counting)
    timing = time_by_architecture(three_models, TINY_SPEED)
    rounds = TINY_SPEED.warmup_runs + TINY_SPEED.timed_runs
    # Interleaved as before, over one model per architecture: original, pruned, original, ...
    assert timed == ["original", "pruned"] * rounds
    assert list(timing) == ["original", "pruned", "distilled"]
    assert timing["distilled"]["run_times_s"] is timing["pruned"]["run_times_s"]
    assert timing["distilled"]["tokens_per_s"] == timing["pruned"]["tokens_per_s"]
    assert timing["distilled"]["timed_as"] == timing["pruned"]["timed_as"] == "pruned"
    assert timing["pruned"]["shares_timing_with"] == ["distilled"]
    assert timing["distilled"]["shares_timing_with"] == ["pruned"]
    assert timing["original"]["timed_as"] == "original" and timing["original"]["shares_timing_with"] == []
    assert len(timing["original"]["run_times_s"]) == TINY_SPEED.timed_runs
    assert timing["original"]["run_times_s"] is not timing["pruned"]["run_times_s"]


def test_the_architecture_signature_ignores_weights_and_sees_what_sets_the_cost(tiny_model, tiny_tokenizer):
    signature = architecture_signature(tiny_model)
    assert architecture_signature(_retrained(tiny_model, seed=3)) == signature
    assert architecture_signature(build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=7)) == signature
    assert architecture_signature(build_tiny_gemma3(tiny_tokenizer, num_layers=5)) != signature
    assert architecture_signature(copy.deepcopy(tiny_model).to(torch.bfloat16)) != signature
    # The same shapes, another attention pattern: without layer 2 (full attention) the model
    # keeps only one full-attention layer, without layer 0 it keeps two.
    without_full = architecture_signature(prune_layers(copy.deepcopy(tiny_model), [2]))
    without_sliding = architecture_signature(prune_layers(copy.deepcopy(tiny_model), [0]))
    assert without_full != without_sliding


def test_macs_per_token_is_the_linear_layers_and_the_output_head(tiny_model):
    c = tiny_model.config
    h, d = c.hidden_size, c.head_dim
    attention = h * c.num_attention_heads * d + 2 * h * c.num_key_value_heads * d + c.num_attention_heads * d * h
    mlp = 3 * h * c.intermediate_size
    assert macs_per_token(tiny_model) == 6 * (attention + mlp) + c.vocab_size * h
    assert macs_per_token(prune_layers(tiny_model, [0, 1])) == 4 * (attention + mlp) + c.vocab_size * h


def test_profiles_time_each_architecture_once_and_keep_each_models_own_facts(three_models, tmp_path):
    refs = {
        name: write_checkpoint(tmp_path / name, lambda tmp, m=model, t=tok: save_model(m, t, tmp))
        for name, (model, tok) in three_models.items()
    }
    profiles = profile_checkpoints(refs, TINY_SPEED)
    pruned, distilled = profiles["pruned"], profiles["distilled"]
    assert distilled["timed_as"] == "pruned" and distilled["run_times_s"] == pruned["run_times_s"]
    assert profiles["original"]["timed_as"] == "original"
    assert distilled["architecture"] == pruned["architecture"] != profiles["original"]["architecture"]
    assert distilled["macs_per_token"] == pruned["macs_per_token"] < profiles["original"]["macs_per_token"]
    assert [p["layers"] for p in profiles.values()] == [6, 5, 5]
    assert all(isinstance(p["sample_continuation"], str) for p in profiles.values())


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


def test_no_tie_check_for_one_shared_timing_or_for_different_architectures():
    times = {"run_times_s": [1.0, 1.1, 0.9, 1.0, 1.05]}
    shared = {**times, "timed_as": "pruned", "architecture": "a"}
    assert speed_tie({"pruned": shared, "distilled": shared}) is None
    other = {"run_times_s": [1.3, 1.4, 1.2, 1.35, 1.3], "timed_as": "distilled", "architecture": "b"}
    assert speed_tie({"pruned": {**shared, "timed_as": "pruned"}, "distilled": other}) is None
    # Timed separately although of one architecture: checked, and here flagged.
    assert speed_tie({"pruned": shared, "distilled": {**other, "architecture": "a"}})["noisy"]


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
