"""The closed-form linear map in place of a removed block: fitted on the teacher's activations,
folded into stock weights, and as good on a forward pass as the fit says."""

from __future__ import annotations

import copy

import pytest
import torch

from tailor.config.settings import ConfigError, load_config
from tailor.data.corpus import build_samples
from tailor.prune.linear_map import fit_linear_map
from tailor.prune.pruning import PruneError, prune_layers
from tailor.prune.trunk import decoder_layers

TEXTS = [
    "The capital of France is Paris. Machine learning is the study of algorithms.",
    "Once upon a time a small cat found a red ball in the garden and played all day.",
    "Rain fell on the old town while the market opened and the baker sold warm bread.",
    "A river runs through the valley, past farms and mills, down to the grey sea.",
] * 8


def _hidden_after(model, layer: int, samples) -> torch.Tensor:
    """The residual stream after decoder ``layer`` at the real tokens."""
    seen = {}
    hook = decoder_layers(model)[layer].register_forward_hook(
        lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(input_ids=samples["input_ids"], attention_mask=samples["attention_mask"])
    hook.remove()
    return seen["h"][samples["attention_mask"].bool()].double()


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).sum().item()


@pytest.fixture
def samples(tiny_tokenizer):
    return build_samples(tiny_tokenizer, TEXTS, 24, len(TEXTS))


@pytest.mark.parametrize("model_name", ["tiny_model", "tiny_llama"])
@pytest.mark.parametrize("cut", ["last", "middle"])
def test_the_map_closes_the_gap_it_reports_and_the_checkpoint_keeps_the_pruned_shape(
    request, samples, model_name, cut, tmp_path
):
    from transformers import AutoModelForCausalLM

    teacher = request.getfixturevalue(model_name).eval()
    n = len(decoder_layers(teacher))
    removed = [n - 2, n - 1] if cut == "last" else [2, 3]
    pruned = prune_layers(copy.deepcopy(teacher), removed)
    mapped = copy.deepcopy(pruned)

    fit = fit_linear_map(mapped, teacher, samples)

    k = removed[0] - 1
    assert (fit.layer, fit.replaced) == (k, tuple(removed))
    assert fit.tokens == int(samples["attention_mask"].sum())
    target = _hidden_after(teacher, removed[-1], samples)
    before = _squared_error(_hidden_after(pruned, k, samples), target)
    after = _squared_error(_hidden_after(mapped, k, samples), target)
    # The fit's own account of the error is what a forward pass of the folded weights gives.
    assert 1 - after / before == pytest.approx(fit.explained, abs=1e-3)
    assert 0.1 < fit.explained <= 1
    # Only the layer before the cut changed, and nothing was added.
    changed = [
        name
        for (name, a), (_, b) in zip(pruned.state_dict().items(), mapped.state_dict().items(), strict=True)
        if not torch.equal(a, b)
    ]
    assert changed and all(name.startswith(f"model.layers.{k}.") for name in changed), changed
    assert sum(p.numel() for p in mapped.parameters()) == sum(p.numel() for p in pruned.parameters())
    mapped.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(samples["input_ids"]).logits, mapped(samples["input_ids"]).logits)


def test_a_block_it_cannot_stand_in_for_is_refused(tiny_model, samples):
    teacher = tiny_model.eval()
    for removed in ([0, 1], [1, 4]):  # no layer before the block; two blocks
        with pytest.raises(PruneError, match="one contiguous removed block after the first layer"):
            fit_linear_map(prune_layers(copy.deepcopy(teacher), removed), teacher, samples)


def test_settings_refuse_a_map_with_a_replacement_layer_or_a_cut_it_cannot_fill():
    from tailor.preflight import check_trainable_layers

    with pytest.raises(ConfigError, match="linear_map and distill.replacement_layer both fill the removed block"):
        load_config("smoke", ["distill.linear_map=true", "distill.replacement_layer=true"])
    cfg = load_config("smoke", ["prune.strategy=indices", "prune.indices=[0,1]", "distill.linear_map=true"])
    with pytest.raises(ConfigError, match="linear_map=true needs one contiguous removed block after the first layer"):
        check_trainable_layers(cfg, 4)
