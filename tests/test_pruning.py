import pytest
import torch
from transformers import AutoModelForCausalLM

from tailor.prune.pruning import PruneError, find_layers, prune_layers, resolve_indices


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("remove", [[4, 5], [1, 3], [0]])
def test_remaining_weights_identical_and_config_consistent(tiny_model, remove):
    before = _state(tiny_model)
    types_before = list(tiny_model.config.layer_types)
    prune_layers(tiny_model, remove)
    keep = [i for i in range(6) if i not in remove]
    assert tiny_model.config.num_hidden_layers == len(keep)
    assert tiny_model.config.layer_types == [types_before[i] for i in keep]
    after = tiny_model.state_dict()
    for new_idx, old_idx in enumerate(keep):
        for key, value in after.items():
            if key.startswith(f"model.layers.{new_idx}."):
                old_key = key.replace(f"model.layers.{new_idx}.", f"model.layers.{old_idx}.", 1)
                assert torch.equal(value, before[old_key]), key
    for new_idx, layer in enumerate(tiny_model.model.layers):
        assert layer.self_attn.layer_idx == new_idx
        assert layer.self_attn.is_sliding == (tiny_model.config.layer_types[new_idx] == "sliding_attention")


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_llama"])
def test_pruned_model_saves_reloads_and_generates(fixture, request, tiny_tokenizer, tmp_path):
    model = request.getfixturevalue(fixture)
    prune_layers(model, [1, 2])
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    enc = tiny_tokenizer(
        "The quick brown fox jumps over the lazy dog, then a teacher and a student learn from data", return_tensors="pt"
    )
    assert enc["input_ids"].shape[1] > 16, "prompt must exceed the sliding window"
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, reloaded(**enc).logits)
        cached = model.generate(**enc, max_new_tokens=10, do_sample=False)
        uncached = model.generate(**enc, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_resolve_indices_rules():
    assert resolve_indices(18, 2, None) == [16, 17]
    assert resolve_indices(18, 2, [5, 3]) == [3, 5]
    with pytest.raises(PruneError, match="allowed: 1..17"):
        resolve_indices(18, 18, None)
    with pytest.raises(PruneError, match="allowed: 1..17"):
        resolve_indices(18, 0, None)
    with pytest.raises(PruneError, match=r"out of range; allowed: 0..17"):
        resolve_indices(18, 2, [3, 18])
    with pytest.raises(PruneError, match="duplicates"):
        resolve_indices(18, 2, [3, 3])
    with pytest.raises(PruneError, match="keep at least one"):
        resolve_indices(2, 1, [0, 1])


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(PruneError, match="cannot find the decoder layer list"):
        find_layers(torch.nn.Linear(2, 2))
