"""Recipe settings of the training loop: what trains, and the held-out healing curve."""

from __future__ import annotations

import pytest
import torch

from tailor.config.settings import DistillConfig
from tailor.data.corpus import build_samples
from tailor.distill.kd_loss import LossSpec
from tailor.distill.losses import LiveTeacherKDLoss
from tailor.distill.trainer import Distiller, DistillError
from tailor.evaluate.perplexity import heldout_perplexity
from tailor.models.tiny import build_tiny_gemma3

TEXTS = [
    "The capital of France is Paris. Machine learning is the study of algorithms.",
    "Once upon a time a small cat found a red ball in the garden and played all day.",
] * 4


def _pair(tokenizer):
    teacher = build_tiny_gemma3(tokenizer, num_layers=4, seed=0).eval()
    student = build_tiny_gemma3(tokenizer, num_layers=3, seed=1)
    return teacher, student


@pytest.mark.parametrize("matmuls", [torch.float32, torch.bfloat16])
def test_a_frozen_head_gets_no_gradient_and_the_same_hidden_gradient(tiny_tokenizer, matmuls):
    teacher, student = _pair(tiny_tokenizer)
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=4)
    ids, mask = samples["input_ids"], samples["attention_mask"]
    t_h = teacher.model(input_ids=ids, attention_mask=mask).last_hidden_state
    grads = []
    for frozen in (False, True):
        student.get_output_embeddings().weight.requires_grad_(not frozen)
        s_h = student.model(input_ids=ids, attention_mask=mask).last_hidden_state.detach().requires_grad_(True)
        kd = LiveTeacherKDLoss(LossSpec(), chunk_tokens=8, matmul_dtype=matmuls)
        loss = kd(student, s_h, teacher, t_h, mask, ids)
        loss.backward()
        grads.append((loss.detach(), s_h.grad.clone()))
    assert student.get_output_embeddings().weight.grad is not None  # from the unfrozen pass only
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_train_last_layers_and_frozen_embeddings_leave_the_rest_untouched(tiny_tokenizer):
    teacher, student = _pair(tiny_tokenizer)
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = DistillConfig(
        learning_rate=1e-2,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=1,
        num_samples=8,
        freeze_embeddings=True,
        train_last_layers=1,
    )
    record = Distiller(teacher, student, samples, cfg).fit()
    after = student.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.2.", "model.norm.")) for k in changed)
    trainable = sum(
        p.numel() for n, p in student.named_parameters() if n.startswith(("model.layers.2.", "model.norm."))
    )
    assert record.trainable_parameters == trainable
    assert all(p.requires_grad for p in student.parameters())  # switched back on for whoever uses it next
    with pytest.raises(DistillError, match="distill.train_last_layers=5 exceeds the student's 3 decoder layers"):
        Distiller(teacher, student, samples, cfg.model_copy(update={"train_last_layers": 5})).fit()


def test_the_healing_curve_scores_heldout_perplexity_before_every_n_steps_and_at_the_end(tiny_tokenizer):
    teacher, student = _pair(tiny_tokenizer)
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    heldout = {"held": build_samples(tiny_tokenizer, ["A held-out story about a dog and a ball."], 16, 1)}
    seen = []
    cfg = DistillConfig(
        learning_rate=3e-3, batch_size=2, grad_accum=1, seq_len=16, epochs=2, num_samples=8, heldout_every=3
    )
    record = Distiller(teacher, student, samples, cfg, heldout=heldout, on_heldout=lambda s, p: seen.append(s)).fit()
    steps = [s for s, _ in record.heldout_curve]
    assert steps == seen == [0, 3, 6, 8]
    # The last point is the trained student's held-out perplexity, scored like any checkpoint's.
    assert record.heldout_curve[-1][1] == pytest.approx(heldout_perplexity(student, heldout)["perplexity"])
    assert record.heldout_curve[-1][1] != record.heldout_curve[0][1]


def test_training_more_layers_than_pruning_leaves_fails_before_work():
    from tailor.config.settings import ConfigError, load_config
    from tailor.models.sources import source_num_layers
    from tailor.preflight import check_trainable_layers

    cfg = load_config("smoke", ["distill.train_last_layers=99"])
    layers = source_num_layers(cfg.model)
    with pytest.raises(
        ConfigError,
        match=rf"distill.train_last_layers=99 exceeds the {layers - 1} decoder layers "
        rf"left after pruning; allowed: 0 \(all\) to {layers - 1}",
    ):
        check_trainable_layers(cfg, layers)
    check_trainable_layers(load_config("smoke", [f"distill.train_last_layers={layers - 1}"]), layers)
    later = load_config("smoke", ["distill.then=[{num_samples: 8}, {train_last_layers: 99}]"])
    with pytest.raises(ConfigError, match=r"distill.then\[1\].train_last_layers=99 exceeds the"):
        check_trainable_layers(later, layers)
