"""Layer-importance scores and the layers each strategy removes."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tailor.config.settings import PruneConfig
from tailor.data.corpus import build_samples
from tailor.preflight import check_prune
from tailor.prune.importance import _perplexity, choose_layers, layer_scores, per_layer_series
from tailor.prune.pruning import PruneError, prune_layers

TEXTS = [
    "The capital of France is Paris. Machine learning is the study of algorithms. " * 2,
    "A student learns from a teacher.",
    "The quick brown fox jumps over the lazy dog. " * 3,
]
ALL = ("block_influence", "angular", "leave_one_out")


def _samples(tokenizer, n=6):
    return build_samples(tokenizer, TEXTS * 3, seq_len=20, num_samples=n, windows_per_doc=64)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_llama"])
def test_hidden_state_scores_match_a_direct_computation(fixture, request, tiny_tokenizer):
    model = request.getfixturevalue(fixture)
    samples = _samples(tiny_tokenizer)
    assert (samples["attention_mask"] == 0).any(), "the calibration set must contain padding"
    scores = layer_scores(model, samples, batch_size=4, strategies=ALL)
    with torch.no_grad():
        hs = model(**samples, output_hidden_states=True).hidden_states
    keep = samples["attention_mask"].bool()
    L = model.config.num_hidden_layers
    # hidden_states[i] is the input of layer i for i < L (the last entry is after the final norm).
    for i in range(L - 1):
        cos = torch.nn.functional.cosine_similarity(hs[i][keep].double(), hs[i + 1][keep].double(), dim=-1)
        assert scores["block_influence"][i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)
        cos2 = torch.nn.functional.cosine_similarity(hs[0][keep].double(), hs[i + 1][keep].double(), dim=-1)
        assert scores["angular"][0][i + 1] == pytest.approx(
            math.acos(cos2.mean().clamp(-1, 1).item()) / math.pi, abs=1e-6
        )
    for i in range(L):
        pruned = prune_layers(copy.deepcopy(model), [i])
        expected = _perplexity(pruned, samples, 4) - scores["calibration_perplexity"]
        assert scores["leave_one_out"][i] == pytest.approx(expected, rel=1e-5)


def test_padding_content_does_not_change_the_scores(tiny_model, tiny_tokenizer):
    samples = _samples(tiny_tokenizer)
    other = {**samples, "input_ids": samples["input_ids"].masked_fill(samples["attention_mask"] == 0, 7)}
    a = layer_scores(tiny_model, samples, 3, ("block_influence", "angular"))
    b = layer_scores(tiny_model, other, 3, ("block_influence", "angular"))
    assert a["block_influence"] == pytest.approx(b["block_influence"], abs=1e-9)


def test_leave_one_out_leaves_the_model_as_it_was(tiny_model, tiny_tokenizer):
    samples = _samples(tiny_tokenizer)
    before = copy.deepcopy(tiny_model.config.to_dict())
    with torch.no_grad():
        logits = tiny_model(**samples).logits
    layer_scores(tiny_model, samples, 3, ("leave_one_out",))
    assert tiny_model.config.to_dict() == before
    assert [layer.self_attn.layer_idx for layer in tiny_model.model.layers] == list(range(6))
    with torch.no_grad():
        assert torch.equal(tiny_model(**samples).logits, logits)


def test_each_strategy_picks_its_layers():
    scores = {
        "num_layers": 6,
        "block_influence": [0.5, 0.1, 0.3, 0.05, 0.4, 0.9],
        "leave_one_out": [9.0, 0.2, 0.1, 3.0, 0.3, 7.0],
        "angular": [[None] + [0.5] * 6 for _ in range(6)],
    }
    scores["angular"][2][4] = 0.01  # the block of layers 2 and 3 changes the stream least
    pick = lambda strategy, n=2, **kw: choose_layers(PruneConfig(strategy=strategy, num_layers=n, **kw), 6, scores)  # noqa: E731
    assert pick("last") == [4, 5]
    assert pick("indices", indices=(0, 3)) == [0, 3]
    assert pick("block_influence") == [1, 3]
    assert pick("leave_one_out") == [1, 2]
    assert pick("angular") == [2, 3]
    assert per_layer_series(scores, "angular", 2)[2] == 0.01
    assert math.isnan(per_layer_series(scores, "angular", 2)[5])


def test_bad_pruning_settings_are_named():
    with pytest.raises(PruneError, match=r"prune.strategy='angular': a block of prune.num_layers=18"):
        check_prune(PruneConfig(strategy="angular", num_layers=18), 18)
    with pytest.raises(PruneError, match=r"prune.indices \[18\] out of range; allowed: 0..17"):
        check_prune(PruneConfig(strategy="indices", indices=(18,)), 18)
    with pytest.raises(PruneError, match="prune.calibration_samples=4 is smaller than one batch"):
        check_prune(PruneConfig(strategy="block_influence", calibration_samples=4, calibration_batch_size=8), 18)
    with pytest.raises(ValueError, match="prune.indices is set exactly when prune.strategy='indices'"):
        PruneConfig(strategy="last", indices=(1,))


def test_too_few_calibration_samples_for_a_batch(tiny_model, tiny_tokenizer):
    with pytest.raises(PruneError, match="smaller than one batch"):
        layer_scores(tiny_model, _samples(tiny_tokenizer, n=2), batch_size=4, strategies=("block_influence",))
