"""Training objectives: each loss's value and gradient against a plain reference, and the trainer runs them."""

from __future__ import annotations

import math

import pytest
import torch

from tailor.config.settings import ConfigError, DistillConfig, load_config
from tailor.data.corpus import build_samples
from tailor.distill.kd_loss import LossCounts
from tailor.distill.objectives import HiddenStateDistance, build_objective
from tailor.distill.trainer import Distiller
from tailor.models.tiny import build_tiny_gemma3

TEXTS = [
    "The capital of France is Paris. Machine learning is the study of algorithms.",
    "Once upon a time a small cat found a red ball in the garden and played all day.",
] * 4


def _plain(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """The per-token distance written out with loops, averaged over real tokens."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            a, c = s[b, i], t[b, i]
            if loss == "mse":
                total = total + ((a - c) ** 2).sum() / (c**2).sum()
            else:
                total = total + 1 - (a @ c) / (a.norm() * c.norm())
            n += 1
    return total / n


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_losses_match_a_plain_reference_in_value_and_gradient_and_ignore_padding(loss):
    torch.manual_seed(0)
    s = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    ids = torch.zeros_like(mask)
    objective = HiddenStateDistance(loss)
    value = objective(None, s, (None, t), mask, ids, objective.counts(mask, ids))
    (grad,) = torch.autograd.grad(value, s)
    s_ref = s.detach().clone().requires_grad_(True)
    expected = _plain(s_ref, t, mask, loss)
    (grad_ref,) = torch.autograd.grad(expected, s_ref)
    torch.testing.assert_close(value.double(), expected.double())
    torch.testing.assert_close(grad.double(), grad_ref)
    assert torch.all(grad[mask == 0] == 0)


def test_the_global_batch_counts_normalise_a_micro_batch():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.long)
    objective = HiddenStateDistance("mse")
    local = objective(None, s, (None, t), mask, mask, LossCounts(4, 3, 1))
    half = objective(None, s, (None, t), mask, mask, LossCounts(8, 6, 2))
    torch.testing.assert_close(half, local / 2)


def test_a_hidden_state_student_trains_toward_the_teacher_without_its_output_head(tiny_tokenizer):
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=0).eval()
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=3, seed=1)
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    cfg = DistillConfig(
        objective="hidden",
        learning_rate=3e-3,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=4,
        num_samples=8,
        freeze_embeddings=True,
    )
    head = student.get_output_embeddings().weight.clone()
    record = Distiller(teacher, student, samples, cfg).fit()
    assert record.loss == {"objective": "hidden", "hidden_loss": "mse"}
    assert record.losses[-1] < record.losses[0]
    assert torch.equal(student.get_output_embeddings().weight, head)


def test_a_hidden_state_student_may_train_its_tied_embedding(tiny_tokenizer):
    # Without the head, the tied weight's only gradient is the input lookup's: it must stay dense
    # for gradient clipping and AdamW (the logit objective's head gradient made it dense before).
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=0).eval()
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=3, seed=1)
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    cfg = DistillConfig(objective="hidden", learning_rate=3e-3, batch_size=4, grad_accum=1, seq_len=16, epochs=1)
    embedding = student.get_input_embeddings().weight.clone()
    record = Distiller(teacher, student, samples, cfg).fit()
    assert record.optimizer_steps == 2 and all(math.isfinite(n) and n > 0 for n in record.grad_norms)
    assert not torch.equal(student.get_input_embeddings().weight, embedding)
    assert not student.get_input_embeddings().sparse  # as it was before training


def test_the_objective_is_chosen_by_settings_and_checked_before_work():
    assert build_objective(DistillConfig()).name == "logits"  # the default, and the book profile's
    assert load_config("book").distill.objective == "logits"
    assert build_objective(DistillConfig(objective="hidden", hidden_loss="cosine")).describe() == {
        "objective": "hidden",
        "hidden_loss": "cosine",
    }
    with pytest.raises(ConfigError, match="distill.objective"):
        load_config("smoke", ["distill.objective=features"])
    with pytest.raises(ConfigError, match="teacher_topk=8 caches logits and needs distill.objective='logits'"):
        load_config("smoke", ["distill.objective=hidden", "distill.teacher_topk=8"])


@pytest.mark.parametrize("objective", ["logits", "hidden"])
def test_a_student_sharing_the_teachers_first_layers_trains_to_the_same_weights_from_one_trunk_forward(
    tiny_tokenizer, objective
):
    import copy

    from tailor.prune.pruning import prune_layers

    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0).eval()
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    cfg = DistillConfig(
        objective=objective,
        learning_rate=3e-3,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=2,
        num_samples=8,
        freeze_embeddings=True,
        train_last_layers=2,
    )
    results = []
    for share in (True, False):
        student = prune_layers(copy.deepcopy(teacher), [4, 5])
        record = Distiller(teacher, student, samples, cfg, share_trunk=share).fit()
        results.append((record, student.state_dict()))
    (shared, weights), (separate, weights_separate) = results
    assert shared.shared_trunk_layers == 2 and separate.shared_trunk_layers == 0
    assert shared.losses == separate.losses
    assert all(torch.equal(weights[k], weights_separate[k]) for k in weights)
    # A student whose early layers differ from the teacher's shares nothing.
    other = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=1)
    assert Distiller(teacher, other, samples, cfg).fit().shared_trunk_layers == 0


def test_a_replacement_layer_takes_the_removed_blocks_place_as_a_copy_of_its_first_layer(tiny_tokenizer):
    import copy

    from tailor.prune.pruning import PruneError, equal_weights, prune_layers, replace_removed_block
    from tailor.prune.trunk import decoder_layers

    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0).eval()
    student = prune_layers(copy.deepcopy(teacher), [3, 4, 5])
    assert replace_removed_block(student, teacher) == 3
    assert student.config.num_hidden_layers == 4
    assert student.config.layer_types == teacher.config.layer_types[:4]
    assert equal_weights(decoder_layers(student)[3], decoder_layers(teacher)[3])
    assert [layer.self_attn.layer_idx for layer in decoder_layers(student)] == [0, 1, 2, 3]
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    # With the block's first layer back, the student is the teacher without layers 4 and 5.
    reference = prune_layers(copy.deepcopy(teacher), [4, 5])
    torch.testing.assert_close(student(ids).logits, reference(ids).logits, rtol=0, atol=0)
    gapped = prune_layers(copy.deepcopy(teacher), [1, 4])
    with pytest.raises(PruneError, match="one contiguous removed block; layers \\[1, 4\\]"):
        replace_removed_block(gapped, teacher)
    with pytest.raises(ConfigError, match="replacement_layer=true needs one contiguous removed block"):
        from tailor.preflight import check_trainable_layers

        check_trainable_layers(
            load_config("smoke", ["prune.strategy=indices", "prune.indices=[0,2]", "distill.replacement_layer=true"]), 4
        )


def test_a_bfloat16_teacher_shares_its_trunk_and_hands_over_the_state_its_matmuls_computed(tiny_tokenizer):
    import copy

    from tailor.models.precision import to_bfloat16_matmuls
    from tailor.prune.pruning import prune_layers

    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0).eval()
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    cfg = DistillConfig(
        objective="hidden",
        learning_rate=3e-3,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=2,
        num_samples=8,
        freeze_embeddings=True,
        train_last_layers=2,
    )
    students = [prune_layers(copy.deepcopy(teacher), [4, 5]) for _ in range(2)]
    to_bfloat16_matmuls(teacher, samples["input_ids"])
    shared = Distiller(teacher, students[0], samples, cfg).fit()
    separate = Distiller(teacher, students[1], samples, cfg, share_trunk=False).fit()
    assert shared.shared_trunk_layers == 2
    # The student's float32 trunk and the teacher's bfloat16 one differ by rounding only.
    torch.testing.assert_close(torch.tensor(shared.losses), torch.tensor(separate.losses), rtol=0.05, atol=0.01)
