"""Teacher precision, the student's optional bfloat16 autocast and gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from tailor.config.settings import DistillConfig
from tailor.data.corpus import build_samples
from tailor.distill.fused_head import logits_into
from tailor.distill.kd_loss import LossSpec
from tailor.distill.losses import LiveTeacherKDLoss
from tailor.distill.teacher_cache import compute_topk
from tailor.distill.trainer import Distiller
from tailor.models.precision import (
    fast_bfloat16,
    final_hidden,
    has_bfloat16_matmuls,
    resolve_bf16_autocast,
    resolve_teacher_dtype,
    to_bfloat16_matmuls,
)
from tailor.models.tiny import build_tiny_gemma3

TEXTS = ["The capital of France is Paris. A student learns from a teacher. " * 3] * 8


def _samples(tokenizer, n=6):
    return build_samples(tokenizer, TEXTS + ["short"], seq_len=24, num_samples=n, windows_per_doc=64)


def test_blocked_logits_equal_the_direct_product_across_block_edges():
    torch.manual_seed(0)
    weight, hidden = torch.randn(2500, 16), torch.randn(5, 16)  # 2500: a partial last block
    out = logits_into(hidden, weight, torch.empty(5, 2500))
    assert torch.allclose(out, hidden @ weight.T, rtol=1e-5, atol=1e-5)
    widened = logits_into(hidden.bfloat16(), weight.bfloat16(), torch.empty(5, 2500))
    assert widened.dtype == torch.float32
    assert torch.equal(widened, (hidden.bfloat16() @ weight.bfloat16().T).float())


def test_auto_teacher_precision_follows_the_device():
    assert resolve_teacher_dtype("float32", "cpu") == "float32"
    assert resolve_teacher_dtype("bfloat16", "cpu") == "bfloat16"
    assert resolve_teacher_dtype("auto", "cpu") == ("bfloat16" if fast_bfloat16("cpu") else "float32")


def test_bfloat16_teacher_keeps_a_float32_residual_stream_and_a_close_loss(tiny_tokenizer):
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=0)
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=1)
    samples = _samples(tiny_tokenizer)
    ids, mask = samples["input_ids"], samples["attention_mask"]
    spec = LossSpec(temperature=2.0)
    with torch.no_grad():
        s_hidden = final_hidden(student, ids, mask)
        exact = LiveTeacherKDLoss(spec)(student, s_hidden, teacher, final_hidden(teacher, ids, mask), mask, ids)
        embedded = teacher.get_input_embeddings()(ids)
        to_bfloat16_matmuls(teacher, ids)
        assert has_bfloat16_matmuls(teacher)
        assert teacher.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        assert teacher.get_output_embeddings().weight.dtype == torch.bfloat16
        assert teacher.model.layers[0].input_layernorm.weight.dtype == torch.float32
        assert torch.equal(teacher.get_input_embeddings()(ids), embedded)  # float32 rows, not rounded ones
        t_hidden = final_hidden(teacher, ids, mask)
        assert t_hidden.dtype == torch.float32
        approx = LiveTeacherKDLoss(spec)(student, s_hidden, teacher, t_hidden, mask, ids)
    assert approx.item() == pytest.approx(exact.item(), rel=2e-2)
    assert approx.item() != exact.item()  # it did run in bfloat16


def test_bfloat16_teacher_refuses_tokens_it_kept_no_float32_rows_for(tiny_tokenizer):
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=0)
    ids = _samples(tiny_tokenizer)["input_ids"]
    to_bfloat16_matmuls(teacher, ids)
    unseen = next(t for t in range(teacher.config.vocab_size) if t not in set(ids.flatten().tolist()))
    with pytest.raises(ValueError, match="float32 embedding rows"):
        teacher.get_input_embeddings()(torch.tensor([[unseen]]))


def test_top_k_cache_from_a_bfloat16_teacher(tiny_tokenizer):
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=0)
    samples = _samples(tiny_tokenizer, n=3)
    exact = compute_topk(teacher, samples, 8, 2.0, batch_size=2)
    to_bfloat16_matmuls(teacher, samples["input_ids"])
    approx = compute_topk(teacher, samples, 8, 2.0, batch_size=2)
    assert approx["values"].shape == exact["values"].shape
    assert torch.allclose(approx["values"].float(), exact["values"].float(), rtol=5e-2, atol=5e-2)


def _models_and_batch(tokenizer, teacher_layers=4):
    """A tiny teacher, a smaller student, one batch and the teacher's final hidden states on it."""
    teacher = build_tiny_gemma3(tokenizer, num_layers=teacher_layers, seed=0)
    student = build_tiny_gemma3(tokenizer, num_layers=2, seed=1)
    samples = _samples(tokenizer)
    ids, mask = samples["input_ids"], samples["attention_mask"]
    with torch.no_grad():
        t_hidden = final_hidden(teacher, ids, mask)
    return teacher, student, ids, mask, t_hidden


def _train(tokenizer, **options):
    teacher = build_tiny_gemma3(tokenizer, num_layers=4, seed=0)
    student = build_tiny_gemma3(tokenizer, num_layers=2, seed=1)
    cfg = DistillConfig(
        batch_size=3,
        grad_accum=1,
        epochs=2,
        seq_len=24,
        num_samples=6,
        learning_rate=1e-3,
        teacher_dtype="float32",
        checkpoint_every=0,
        **options,
    )
    record = Distiller(teacher, student, _samples(tokenizer), cfg).fit()
    return student, record


def test_gradient_checkpointing_trains_to_the_same_weights(tiny_tokenizer):
    plain, plain_record = _train(tiny_tokenizer)
    ckpt, ckpt_record = _train(tiny_tokenizer, gradient_checkpointing=True)
    assert ckpt_record.gradient_checkpointing is True
    assert ckpt_record.losses == pytest.approx(plain_record.losses, rel=1e-5)
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name
    assert not ckpt.is_gradient_checkpointing  # switched off again for evaluation
    assert not ckpt.get_input_embeddings().sparse  # and the lookup's sparse gradient (training only)


def test_bf16_autocast_trains_a_float32_student_close_to_float32_training(tiny_tokenizer):
    plain, plain_record = _train(tiny_tokenizer)
    mixed, mixed_record = _train(tiny_tokenizer, bf16_autocast=True)
    assert mixed_record.bf16_autocast is True
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert mixed_record.losses == pytest.approx(plain_record.losses, rel=5e-2)
    assert mixed_record.losses != plain_record.losses  # it did run in bfloat16


def test_auto_bf16_autocast_follows_the_device(tiny_tokenizer):
    assert resolve_bf16_autocast("auto", "cpu") == fast_bfloat16("cpu")
    assert resolve_bf16_autocast(False, "cpu") is False and resolve_bf16_autocast(True, "cpu") is True
    _, record = _train(tiny_tokenizer, bf16_autocast="auto")
    assert record.bf16_autocast is fast_bfloat16("cpu")
    with pytest.raises(ValueError, match="bf16_autocast"):
        DistillConfig(bf16_autocast="sometimes")


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_bfloat16_head_matmuls_stay_close_to_float32(tiny_tokenizer, kind):
    teacher, student, ids, mask, t_hidden = _models_and_batch(tiny_tokenizer)
    spec = LossSpec(temperature=2.0, kind=kind, alpha=0.2)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        student.zero_grad()
        hidden = final_hidden(student, ids, mask).detach().requires_grad_(True)
        kd = LiveTeacherKDLoss(spec, chunk_tokens=7, matmul_dtype=dtype)
        loss = kd(student, hidden, teacher, t_hidden, mask, ids)
        loss.backward()
        results.append((loss.item(), hidden.grad, student.get_output_embeddings().weight.grad.clone()))
    (exact, gh, gw), (approx, gh16, gw16) = results
    assert approx == pytest.approx(exact, rel=2e-2) and approx != exact
    assert gw16.dtype == torch.float32
    for ours, ref in ((gh16, gh), (gw16, gw)):
        assert (ours - ref).norm() / ref.norm() < 3e-2


def test_bfloat16_weight_gradient_does_not_depend_on_how_chunks_are_grouped(tiny_tokenizer, monkeypatch):
    from tailor.distill import fused_head

    teacher, student, ids, mask, t_hidden = _models_and_batch(tiny_tokenizer)
    grads = []
    # One group; a flush every chunk or two; a group smaller than a chunk (7 tokens).
    for group in (fused_head._HeadMatmuls.GRAD_GROUP, 10, 5):
        monkeypatch.setattr(fused_head._HeadMatmuls, "GRAD_GROUP", group)
        student.zero_grad()
        hidden = final_hidden(student, ids, mask).detach().requires_grad_(True)
        loss = LiveTeacherKDLoss(LossSpec(temperature=2.0), chunk_tokens=7, matmul_dtype=torch.bfloat16)
        loss(student, hidden, teacher, t_hidden, mask, ids).backward()
        grads.append((hidden.grad, student.get_output_embeddings().weight.grad.clone()))
    (gh, gw), *smaller = grads
    assert int(mask.sum()) > 2 * 10  # the small groups really flushed several times
    for gh_small, gw_small in smaller:
        assert torch.equal(gh, gh_small)
        # Each group's product is rounded to bfloat16 before its float32 sum: equal to that rounding.
        assert (gw - gw_small).norm() / gw.norm() < 1e-2


def test_sparse_lookup_gradient_of_a_tied_embedding_sums_to_the_dense_one(tiny_tokenizer):
    from tailor.distill.trainer import _sparse_tied_embedding_gradient

    teacher, student, ids, mask, t_hidden = _models_and_batch(tiny_tokenizer, teacher_layers=2)
    weight = student.get_input_embeddings().weight
    assert weight is student.get_output_embeddings().weight
    grads = []
    for sparse in (False, True):
        student.zero_grad(set_to_none=True)
        before = _sparse_tied_embedding_gradient(student, sparse)
        LiveTeacherKDLoss(LossSpec(temperature=2.0), chunk_tokens=7)(
            student, final_hidden(student, ids, mask), teacher, t_hidden, mask, ids
        ).backward()
        _sparse_tied_embedding_gradient(student, before)
        assert not weight.grad.is_sparse
        grads.append(weight.grad.clone())
    assert not student.get_input_embeddings().sparse
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
