import pytest
import torch
import torch.nn.functional as F

from tailor.config.settings import DistillConfig
from tailor.data.corpus import CorpusError, build_samples
from tailor.distill.kd_loss import IGNORE, LossSpec, kd_loss_reference, next_token_targets
from tailor.distill.losses import LiveTeacherKDLoss
from tailor.distill.trainer import Distiller, DistillError
from tailor.models.heads import output_logits


def _hidden(model, ids, mask):
    return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state


def _ids(mask):
    return torch.arange(mask.numel()).reshape(mask.shape) % 7


def test_reference_is_zero_for_identical_logits():
    logits = torch.randn(2, 5, 11)
    mask = torch.ones(2, 5, dtype=torch.long)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss = kd_loss_reference(logits, logits.clone(), mask, _ids(mask), LossSpec(kind=kind))
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def _direct(s, t, mask, T, kind, beta=0.5):
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    if kind == "forward_kl":
        per = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        per = (q * (q.log() - p.log())).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        per = beta * (p * (p.log() - m.log())).sum(-1) + (1 - beta) * (q * (q.log() - m.log())).sum(-1)
    return (per * mask).sum() / mask.sum() * T * T


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_each_divergence_matches_its_formula_and_ignores_padding(kind):
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    spec = LossSpec(temperature=2.0, kind=kind, jsd_beta=0.3)
    expected = _direct(s, t, mask, 2.0, kind, beta=0.3)
    assert kd_loss_reference(s, t, mask, _ids(mask), spec).item() == pytest.approx(expected.item(), rel=1e-5)
    s2 = s.clone()
    s2[0, 3] += 100  # a padded position
    assert kd_loss_reference(s2, t, mask, _ids(mask), spec).item() == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_mixes_in_next_token_cross_entropy_over_real_targets():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 1]])
    targets = next_token_targets(ids, mask)
    assert targets.tolist() == [[2, 3, IGNORE, IGNORE], [5, 6, 1, IGNORE]]
    ce = F.cross_entropy(s.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    kd = _direct(s, t, mask, 2.0, "forward_kl")
    got = kd_loss_reference(s, t, mask, ids, LossSpec(alpha=0.25))
    assert got.item() == pytest.approx((0.75 * kd + 0.25 * ce).item(), rel=1e-5)


def test_book_switch_is_the_notebooks_batchmean_kl():
    torch.manual_seed(0)
    s, t = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    T = 2.0
    # The book: F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean"), padding included.
    book = (torch.softmax(t / T, -1) * (torch.log_softmax(t / T, -1) - torch.log_softmax(s / T, -1))).sum() / 3
    assert kd_loss_reference(s, t, mask, _ids(mask), LossSpec(book=True)).item() == pytest.approx(book.item(), rel=1e-5)


@pytest.mark.parametrize(
    "spec",
    [
        LossSpec(),
        LossSpec(kind="reverse_kl"),
        LossSpec(kind="jsd", jsd_beta=0.3),
        LossSpec(alpha=0.5),
        LossSpec(book=True),
    ],
)
def test_chunked_loss_equals_reference_in_value_and_gradient(tiny_model, tiny_tokenizer, spec):
    teacher = tiny_model
    from tailor.models.tiny import build_tiny_gemma3

    student = build_tiny_gemma3(tiny_tokenizer, num_layers=3, seed=1)
    batch = tiny_tokenizer(
        ["a student learns from a teacher", "the quick brown fox"], padding=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any(), "batch must contain padding"
    with torch.no_grad():
        t_h = _hidden(teacher, ids, mask)
    ref = kd_loss_reference(
        output_logits(student, _hidden(student, ids, mask)), output_logits(teacher, t_h), mask, ids, spec
    )
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    chunked = LiveTeacherKDLoss(spec, chunk_tokens=3)(student, _hidden(student, ids, mask), teacher, t_h, mask, ids)
    chunked.backward()
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(student.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_distillation_lowers_the_loss(tiny_model, tiny_tokenizer):
    from tailor.models.tiny import build_tiny_gemma3

    # A random teacher is nearly uniform; sharpen it (tied embeddings scale the logits) so
    # there is something to learn, and start from an unrelated student.
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight.mul_(20)
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=3, seed=1)
    texts = ["The capital of France is Paris. Machine learning is the study of algorithms."] * 8
    samples = build_samples(tiny_tokenizer, texts, seq_len=16, num_samples=8, windows_per_doc=64)
    cfg = DistillConfig(learning_rate=3e-3, batch_size=4, grad_accum=1, seq_len=16, epochs=6, num_samples=8)
    record = Distiller(tiny_model, student, samples, cfg).fit()
    assert record.optimizer_steps == 12
    assert record.losses[-1] < 0.8 * record.losses[0]


def test_samples_pad_and_mask(tiny_tokenizer):
    samples = build_samples(
        tiny_tokenizer, ["short", "a much longer text " * 10], seq_len=8, num_samples=5, windows_per_doc=64
    )
    assert samples["input_ids"].shape == (5, 8)
    assert samples["attention_mask"][0].tolist()[:2] == [1, 1]
    assert samples["attention_mask"][0].sum() < 8
    with pytest.raises(CorpusError, match="no samples"):
        build_samples(tiny_tokenizer, [], seq_len=8, num_samples=5, windows_per_doc=64)


def test_vocabulary_mismatch_is_refused(tiny_model, tiny_tokenizer):
    from transformers import Gemma3ForCausalLM

    other = Gemma3ForCausalLM(tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "vocab_size": 99}))
    samples = build_samples(tiny_tokenizer, ["some text here"], seq_len=8, num_samples=1, windows_per_doc=64)
    with pytest.raises(DistillError, match="vocabulary"):
        Distiller(tiny_model, other, samples, DistillConfig(num_samples=1)).fit()


def test_every_registered_divergence_is_a_setting_and_back():
    from typing import get_args

    from tailor.distill.divergences import DIVERGENCES

    allowed = get_args(DistillConfig.model_fields["loss"].annotation)
    assert set(allowed) == set(DIVERGENCES)


def test_a_new_divergence_is_one_class_and_trains_through_the_chunked_loss(tiny_model, tiny_tokenizer, monkeypatch):
    from tailor.distill import divergences
    from tailor.models.tiny import build_tiny_gemma3

    class SymmetricKL(divergences.Divergence):  # no closed-form gradient: autograd per chunk
        def per_token(self, log_p, log_q):
            return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)

    monkeypatch.setitem(divergences.DIVERGENCES, "symmetric_kl", lambda spec: SymmetricKL())
    spec = LossSpec(kind="symmetric_kl")
    student = build_tiny_gemma3(tiny_tokenizer, num_layers=3, seed=1)
    batch = tiny_tokenizer(
        ["a student learns from a teacher", "the quick brown fox"], padding=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        t_h = _hidden(tiny_model, ids, mask)
    s_logits, t_logits = output_logits(student, _hidden(student, ids, mask)), output_logits(tiny_model, t_h)
    ref = kd_loss_reference(s_logits, t_logits, mask, ids, spec)
    forward_plus_reverse = kd_loss_reference(s_logits, t_logits, mask, ids, LossSpec()) + kd_loss_reference(
        s_logits, t_logits, mask, ids, LossSpec(kind="reverse_kl")
    )
    assert ref.item() == pytest.approx(forward_plus_reverse.item(), rel=1e-5)
    chunked = LiveTeacherKDLoss(spec, chunk_tokens=3)(student, _hidden(student, ids, mask), tiny_model, t_h, mask, ids)
    chunked.backward()
    assert chunked.item() == pytest.approx(ref.item(), rel=1e-5)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_an_unknown_divergence_names_the_allowed_ones():
    with pytest.raises(ValueError, match="forward_kl, reverse_kl, jsd"):
        kd_loss_reference(
            torch.randn(1, 2, 5),
            torch.randn(1, 2, 5),
            torch.ones(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.long),
            LossSpec(kind="hellinger"),
        )
