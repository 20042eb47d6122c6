"""The cached top-k teacher: its loss, its cache file, and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from tailor.config.settings import ConfigError, DistillConfig, load_config
from tailor.data.corpus import build_samples
from tailor.distill.kd_loss import LossSpec, TopKTeacher
from tailor.distill.losses import LiveTeacherKDLoss, TopKTeacherKDLoss
from tailor.distill.teacher_cache import TeacherCacheError, compute_topk, load_topk_cache
from tailor.distill.trainer import Distiller, lr_factor
from tailor.models.heads import output_logits
from tailor.models.tiny import build_tiny_gemma3

TEXTS = ["The capital of France is Paris. A student learns from a teacher. " * 3] * 8


@pytest.fixture()
def pair(tiny_tokenizer):
    teacher = build_tiny_gemma3(tiny_tokenizer, num_layers=4, seed=0)
    with torch.no_grad():  # a peaked teacher, so the top-k carry most of the mass
        teacher.model.embed_tokens.weight.mul_(20)
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=2, seed=1)
    return teacher, student


def _batch(tokenizer):
    samples = build_samples(tokenizer, TEXTS + ["short"], seq_len=24, num_samples=9)  # document starts
    return samples["input_ids"][-3:], samples["attention_mask"][-3:]  # the last one is padded


def _hidden(model, ids, mask):
    return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize(
    "spec", [LossSpec(temperature=2.0), LossSpec(temperature=1.5, alpha=0.3), LossSpec(temperature=2.0, book=True)]
)
def test_top_k_over_the_whole_vocabulary_is_exact_kd(pair, tiny_tokenizer, spec):
    teacher, student = pair
    ids, mask = _batch(tiny_tokenizer)
    with torch.no_grad():
        t_logits = output_logits(teacher, _hidden(teacher, ids, mask))
    topk = TopKTeacher.from_logits(t_logits, teacher.config.vocab_size, spec.temperature)
    # float16 storage of the logits is the only approximation: compare with exact KD on the
    # same rounded teacher logits by routing the exact loss through float16 too.
    h1 = _hidden(student, ids, mask).detach().requires_grad_(True)
    h2 = h1.detach().clone().requires_grad_(True)
    ours = TopKTeacherKDLoss(spec, chunk_tokens=7)(student, h1, topk, mask, ids)
    with torch.no_grad():
        t_hidden = _hidden(teacher, ids, mask)
    exact = LiveTeacherKDLoss(spec, chunk_tokens=7)(student, h2, teacher, t_hidden, mask, ids)
    ours.backward(), exact.backward()
    assert ours.item() == pytest.approx(exact.item(), rel=2e-3)
    assert torch.allclose(h1.grad, h2.grad, rtol=2e-2, atol=1e-6)


def test_top_k_loss_and_gradient_match_the_k_plus_one_outcome_formula(pair, tiny_tokenizer):
    teacher, student = pair
    ids, mask = _batch(tiny_tokenizer)
    T, k = 2.0, 5
    with torch.no_grad():
        t_logits = output_logits(teacher, _hidden(teacher, ids, mask))
    topk = TopKTeacher.from_logits(t_logits, k, T)
    h = _hidden(student, ids, mask).detach().requires_grad_(True)
    ours = TopKTeacherKDLoss(LossSpec(temperature=T), chunk_tokens=4)(student, h, topk, mask, ids)
    ours.backward()

    # Direct: teacher over (top-k, rest) from its full softmax; student likewise.
    h_ref = h.detach().clone().requires_grad_(True)
    keep = mask.bool()
    log_q = torch.log_softmax(output_logits(student, h_ref)[keep] / T, -1)
    p_full = torch.softmax(t_logits[keep] / T, -1)
    idx = topk.indices[keep].long()
    p_top = p_full.gather(1, idx)
    p = torch.cat([p_top, 1 - p_top.sum(1, keepdim=True)], 1)
    q_top = log_q.exp().gather(1, idx)
    q = torch.cat([q_top, 1 - q_top.sum(1, keepdim=True)], 1)
    direct = (p * (p.log() - q.log())).sum() / keep.sum() * T * T
    direct.backward()
    assert ours.item() == pytest.approx(direct.item(), rel=1e-3)
    assert torch.allclose(h.grad, h_ref.grad, rtol=1e-2, atol=1e-6)


def test_cache_is_checked_against_the_run(pair, tiny_tokenizer, tmp_path):
    teacher, _ = pair
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=24, num_samples=4, windows_per_doc=64)
    cfg = DistillConfig(teacher_topk=8, seq_len=24, num_samples=4, temperature=2.0)
    cache = compute_topk(teacher, samples, k=8, temperature=2.0, batch_size=3)
    assert cache["values"].dtype == torch.float16 and cache["values"].shape == (4, 24, 8)
    path = tmp_path / "cache.pt"
    torch.save(cache, path)
    loaded = load_topk_cache(path, samples, cfg)
    assert torch.equal(loaded.indices, cache["indices"])
    other = {**samples, "input_ids": samples["input_ids"].flip(0)}
    with pytest.raises(TeacherCacheError, match="other distillation samples"):
        load_topk_cache(path, other, cfg)
    with pytest.raises(TeacherCacheError, match="k=8, T=2.0; the run asks k=4"):
        load_topk_cache(path, samples, cfg.model_copy(update={"teacher_topk": 4}))
    for bad in (0, teacher.config.vocab_size + 1):
        with pytest.raises(TeacherCacheError, match="between 1 and the vocabulary size"):
            compute_topk(teacher, samples, k=bad, temperature=2.0)


def test_training_from_the_cache_lowers_the_loss(pair, tiny_tokenizer):
    teacher, student = pair
    samples = build_samples(tiny_tokenizer, TEXTS, seq_len=24, num_samples=8, windows_per_doc=64)
    cfg = DistillConfig(
        teacher_topk=16, learning_rate=1e-3, batch_size=4, grad_accum=1, seq_len=24, epochs=4, num_samples=8
    )
    cache = compute_topk(teacher, samples, 16, cfg.temperature)
    topk = TopKTeacher(cache["values"], cache["indices"], cache["rest_logsumexp"], cfg.temperature)
    record = Distiller(None, student, samples, cfg, topk=topk).fit()
    assert record.teacher == "cached top-16"
    assert record.losses[-1] < record.losses[0]


def test_top_k_needs_forward_kl():
    with pytest.raises(ConfigError, match=r"teacher_topk=8 needs distill.loss='forward_kl'"):
        load_config("smoke", ["distill.teacher_topk=8", "distill.loss=jsd"])


def test_warm_up_then_cosine_decay():
    cfg = DistillConfig(warmup_steps=4, lr_schedule="cosine")
    f = lr_factor(cfg, total_steps=14)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 14))
    constant = lr_factor(DistillConfig(), total_steps=10)
    assert {constant(s) for s in range(10)} == {1.0}
