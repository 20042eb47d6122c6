"""Training objectives: each loss's value and gradient against a plain reference, and the trainer runs them."""

from __future__ import annotations

import math

import pytest
import torch

from tailor.config.settings import ConfigError, DistillConfig, load_config
from tailor.data.corpus import build_samples
from tailor.distill.kd_loss import LossCounts
from tailor.distill.objectives import HiddenStateDistance, StudentStates, Targets, build_objective
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
    value = objective(None, StudentStates(s), Targets(final=t), mask, ids, objective.counts(mask, ids))
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
    local = objective(None, StudentStates(s), Targets(final=t), mask, mask, LossCounts(4, 3, 1))
    half = objective(None, StudentStates(s), Targets(final=t), mask, mask, LossCounts(8, 6, 2))
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


def _plain_sparse_topk(s_hidden, weight, values, indices, rest, mask, temperature):
    """The sparse top-k loss written out per position: the student's k logits from the head rows
    at the teacher's ids, both distributions over k + 1 outcomes with the teacher's rest."""
    total, n = 0.0, 0
    for b in range(s_hidden.shape[0]):
        for i in range(s_hidden.shape[1]):
            if not mask[b, i]:
                continue
            s = torch.stack([weight[j] @ s_hidden[b, i] for j in indices[b, i].tolist()]) / temperature
            t = values[b, i] / temperature
            p = torch.softmax(torch.cat([t, rest[b, i : i + 1]]), 0)
            q = torch.softmax(torch.cat([s, rest[b, i : i + 1]]), 0)
            total = total + (p * (p.log() - q.log())).sum()
            n += 1
    return temperature**2 * total / n


def test_sparse_topk_logits_match_a_plain_reference_in_value_and_gradient(tiny_tokenizer):
    from tailor.distill.kd_loss import TopKTeacher
    from tailor.distill.objectives import SparseTopKKD

    torch.manual_seed(0)
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=1, seed=0).double()
    width = student.config.hidden_size
    s = torch.randn(2, 5, width, dtype=torch.float64, requires_grad=True)
    teacher_logits = torch.randn(2, 5, student.config.vocab_size, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    k, temperature = 4, 2.0
    topk = TopKTeacher.from_logits(teacher_logits, k, temperature)
    objective = SparseTopKKD(temperature, chunk_tokens=3)  # chunks that split the rows
    value = objective(student, StudentStates(s), Targets(topk=topk), mask, mask, objective.counts(mask, mask))
    (grad,) = torch.autograd.grad(value, s)
    s_ref = s.detach().clone().requires_grad_(True)
    weight = student.get_output_embeddings().weight.detach()
    expected = _plain_sparse_topk(
        s_ref, weight, topk.values.double(), topk.indices, topk.rest_logsumexp.double(), mask, temperature
    )
    (grad_ref,) = torch.autograd.grad(expected, s_ref)
    torch.testing.assert_close(value.double(), expected)
    torch.testing.assert_close(grad.double(), grad_ref)
    assert torch.all(grad[mask == 0] == 0)
    # Zero exactly when the student's logits at the teacher's ids are the teacher's.
    at_ids = torch.einsum("btd,btkd->btk", s.detach(), weight[topk.indices.long()])
    same = TopKTeacher(at_ids, topk.indices, topk.rest_logsumexp, temperature)
    zero = objective(student, StudentStates(s.detach()), Targets(topk=same), mask, mask, objective.counts(mask, mask))
    assert abs(float(zero.detach())) < 1e-6  # float32 rounding (the loss computes in float32)


def test_span_and_a_weighted_mix_match_their_plain_references():
    from tailor.distill.objectives import SpanEndDistance

    torch.manual_seed(0)
    final, span = (torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    t_final, t_span = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    states, targets = StudentStates(final, span), Targets(final=t_final, span=t_span)
    only_span = SpanEndDistance("mse")
    counts = only_span.counts(mask, mask)
    value = only_span(None, states, targets, mask, mask, counts)
    torch.testing.assert_close(value.double(), _plain(span, t_span, mask, "mse"))
    (grad_final,) = torch.autograd.grad(value, final, allow_unused=True)
    assert grad_final is None  # the span objective reads only the span state
    mix = build_objective(DistillConfig(objective={"hidden": 1.0, "span": 0.25}, hidden_loss="cosine"))
    assert mix.needs == {"final", "span"} and not mix.uses_output_head
    value = mix(None, states, targets, mask, mask, counts)
    expected = _plain(final, t_final, mask, "cosine") + 0.25 * _plain(span, t_span, mask, "cosine")
    torch.testing.assert_close(value.double(), expected)
    got = torch.autograd.grad(value, (final, span))
    want = torch.autograd.grad(expected, (final, span))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w)
    assert mix.describe() == {
        "objective": "weighted",
        "parts": [
            {"weight": 1.0, "objective": "hidden", "hidden_loss": "cosine"},
            {"weight": 0.25, "objective": "span", "hidden_loss": "cosine"},
        ],
    }


def test_objective_mixes_and_topk_logits_are_checked_before_work():
    assert build_objective(DistillConfig(objective="topk_logits", teacher_topk=8)).needs == {"topk"}
    with pytest.raises(
        ConfigError, match="topk_logits compares the teacher's top-k logits and needs distill.teacher_topk"
    ):
        load_config("smoke", ["distill.objective=topk_logits"])
    with pytest.raises(ConfigError, match="logits trains alone"):
        load_config("smoke", ["distill.objective={logits: 1, hidden: 1}"])
    with pytest.raises(ConfigError, match="weights must be > 0"):
        load_config("smoke", ["distill.objective={hidden: 0}"])
    with pytest.raises(ConfigError, match="'soft' is not one of logits, hidden, span, topk_logits"):
        load_config("smoke", ["distill.objective={hidden: 1, soft: 1}"])
    with pytest.raises(ConfigError, match="span needs one contiguous removed block"):
        from tailor.preflight import check_trainable_layers

        check_trainable_layers(
            load_config("smoke", ["prune.strategy=indices", "prune.indices=[0,2]", "distill.objective=span"]), 4
        )
    with pytest.raises(
        ConfigError, match="span compares the student's state after its layer 1, which train_last_layers=1"
    ):
        check_trainable_layers(
            load_config(
                "smoke",
                [
                    "prune.strategy=indices",
                    "prune.indices=[2]",
                    "distill.objective=span",
                    "distill.train_last_layers=1",
                ],
            ),
            4,
        )


@pytest.mark.parametrize("objective", ["span", "topk_logits", "mix"])
def test_each_new_objective_trains_a_pruned_student_toward_the_teacher(tiny_tokenizer, objective):
    import copy

    from tailor.prune.pruning import prune_layers

    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=6, seed=0).eval()
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=16, num_samples=8)
    chosen = {"span": "span", "topk_logits": "topk_logits", "mix": {"hidden": 1.0, "span": 0.5, "topk_logits": 0.1}}
    cfg = DistillConfig(
        objective=chosen[objective],
        teacher_topk=0 if objective == "span" else 8,
        learning_rate=3e-3,
        batch_size=4,
        grad_accum=1,
        seq_len=16,
        epochs=4,
        num_samples=8,
        freeze_embeddings=True,
        train_last_layers=3,
    )
    student = prune_layers(copy.deepcopy(teacher), [3, 4])
    record = Distiller(teacher, student, samples, cfg).fit()
    assert record.shared_trunk_layers == 1
    assert record.losses[-1] < record.losses[0]


@pytest.mark.parametrize(
    "loss, says, never",
    [
        ({"objective": "hidden", "hidden_loss": "mse"}, "the teacher's final hidden state (mse", "T="),
        (
            {"objective": "logits", "kind": "forward_kl", "temperature": 2.0, "alpha": 0.0, "book": False},
            "logit KD, forward_kl at T=2.0",
            "hidden state",
        ),
        (
            {"objective": "weighted", "parts": [{"weight": 1.0, "objective": "span", "hidden_loss": "mse"}]},
            "1 × the teacher's state entering the first layer kept after the removed block",
            "T=",
        ),
    ],
)
def test_the_registered_versions_description_names_the_objective_that_trained_it(loss, says, never):
    from tailor.registry.promotion import version_description

    report = {
        "config": {
            "model": {"source": "embedded", "name_or_path": ""},
            "distill": {"corpus_mix": {"c.jsonl": 1.0}, "seq_len": 128, "learning_rate": 4e-4, "temperature": 2.0},
            "data": {"mode": "offline"},
        },
        "vs_original": {
            "distilled": {
                "speedup": 1.1,
                "speedup_ci95": None,
                "params_removed_pct": 8.3,
                "mean_acc_retention_pct": None,
            }
        },
        "distillation": {"optimizer_steps": 576, "num_samples": 4608, "loss": loss},
        "pruning": {"removed_layers": [13, 14, 15, 16]},
        "eval_limit": 1000,
    }
    text = version_description(report, "report.md")
    assert says in text and never not in text
