"""Teacher precision, the student's optional bfloat16 autocast and gradient checkpointing, and the
probe that decides what ``auto`` precision becomes on a machine."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from tailor.config.settings import DistillConfig
from tailor.data.corpus import build_samples
from tailor.data.tokenised import TokensRef
from tailor.distill.fused_head import logits_into
from tailor.distill.kd_loss import LossSpec
from tailor.distill.losses import LiveTeacherKDLoss
from tailor.distill.teacher_cache import compute_topk, topk_cache_key
from tailor.distill.trainer import Distiller
from tailor.models import precision
from tailor.models.precision import (
    PROBE_SHAPES,
    PrecisionProbe,
    bfloat16_is_faster,
    final_hidden,
    has_bfloat16_matmuls,
    resolve_bf16_autocast,
    resolve_teacher_dtype,
    teacher_numerics,
    to_bfloat16_matmuls,
)
from tailor.models.tiny import build_tiny_gemma3
from tailor.report.precision import precision_markdown
from tailor.store.checkpoint import CheckpointRef

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


@pytest.fixture
def probe(monkeypatch):
    """Timings on demand for a device with native bfloat16: ``speedup`` is bfloat16's rate over
    float32's, ``calls`` counts the timings; this process's own answers start empty."""
    state = SimpleNamespace(speedup=2.0, calls=0)

    def rates(device):
        state.calls += 1
        return {"x".join(map(str, s)): {"float32": 100.0, "bfloat16": 100.0 * state.speedup} for s in PROBE_SHAPES}

    monkeypatch.setattr(precision, "_matmul_rates", rates)
    monkeypatch.setattr(precision, "fast_bfloat16", lambda device: True)
    monkeypatch.setattr(precision, "_PROBES", {})
    return state


def _probe_file(folder):
    (path,) = folder.glob("precision-*.json")
    return path


def test_the_probe_is_kept_per_machine_and_not_timed_again(probe, tmp_path):
    first = bfloat16_is_faster("cpu", tmp_path)
    assert probe.calls == 1 and first.choice == "bfloat16" and first.supported
    stored = json.loads(_probe_file(tmp_path).read_text())
    assert stored["key"] == precision.probe_key("cpu") and stored["probe"] == first.to_dict()
    precision._PROBES.clear()  # as a new process finds it
    probe.speedup = 0.5  # a re-timing would now choose float32
    assert bfloat16_is_faster("cpu", tmp_path) == first
    assert resolve_bf16_autocast("auto", "cpu", tmp_path) is True
    assert probe.calls == 1


def test_without_a_probe_folder_the_answer_holds_for_the_process(probe):
    first = bfloat16_is_faster("cpu")
    probe.speedup = 0.5
    assert bfloat16_is_faster("cpu") == first and probe.calls == 1


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: "{not json",
        lambda data: json.dumps([data]),
        lambda data: json.dumps({**data, "probe": {**data["probe"], "threads": "two"}}),
        lambda data: json.dumps({**data, "probe": {**data["probe"], "threads": data["probe"]["threads"] + 1}}),
        lambda data: json.dumps({**data, "probe": {**data["probe"], "gflops": {}}}),
        # figures that do not support the stored choice
        lambda data: json.dumps({**data, "probe": {**data["probe"], "choice": "float32"}}),
        lambda data: json.dumps(
            {
                **data,
                "probe": {
                    **data["probe"],
                    "gflops": {k: {"float32": -1.0, "bfloat16": 1.0} for k in data["probe"]["gflops"]},
                },
            }
        ),
    ],
)
def test_a_corrupt_probe_file_is_probed_again_and_replaced(probe, tmp_path, corrupt):
    bfloat16_is_faster("cpu", tmp_path)
    path = _probe_file(tmp_path)
    path.write_text(corrupt(json.loads(path.read_text())))
    precision._PROBES.clear()
    probe.speedup = 0.5
    again = bfloat16_is_faster("cpu", tmp_path)
    assert probe.calls == 2 and again.choice == "float32"
    assert json.loads(path.read_text())["probe"] == again.to_dict()


def test_a_probe_of_another_machine_key_is_not_used(probe, tmp_path, monkeypatch):
    bfloat16_is_faster("cpu", tmp_path)
    path = _probe_file(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "key": {**data["key"], "torch": "0.1"}}))  # a foreign file at this name
    precision._PROBES.clear()
    probe.speedup = 0.5
    assert bfloat16_is_faster("cpu", tmp_path).choice == "float32" and probe.calls == 2
    # Another thread count is another machine key: timed again, kept beside the first.
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 1)
    probe.speedup = 2.0
    assert bfloat16_is_faster("cpu", tmp_path).choice == "bfloat16" and probe.calls == 3
    assert len(list(tmp_path.glob("precision-*.json"))) == 2


def test_no_native_bfloat16_is_float32_without_timing(probe, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "fast_bfloat16", lambda device: False)
    result = bfloat16_is_faster("cpu", tmp_path)
    assert result.choice == "float32" and not result.supported and result.gflops == {}
    assert resolve_teacher_dtype("auto", "cpu", tmp_path) == "float32"
    assert resolve_bf16_autocast("auto", "cpu", tmp_path) is False
    assert probe.calls == 0 and not list(tmp_path.iterdir())
    assert precision_markdown({"precision_probe": result.to_dict()}) == [
        f"- `auto` precision: float32 on {result.device} ({precision.NO_BFLOAT16_RULE})"
    ]


def test_explicit_precisions_are_used_as_given_and_never_probe(probe, tmp_path):
    probe.speedup = 0.5
    assert resolve_teacher_dtype("bfloat16", "cpu", tmp_path) == "bfloat16"
    assert resolve_teacher_dtype("float32", "cpu", tmp_path) == "float32"
    assert resolve_bf16_autocast(True, "cpu", tmp_path) is True
    assert resolve_bf16_autocast(False, "cpu", tmp_path) is False
    assert teacher_numerics("bfloat16", "cpu", tmp_path) == "bfloat16 matmuls, float32 embedding rows"
    assert probe.calls == 0 and not list(tmp_path.iterdir())


@pytest.mark.parametrize(("speedup", "choice"), [(2.0, "bfloat16"), (1.1, "float32"), (0.5, "float32")])
def test_auto_precision_follows_the_probe(probe, tmp_path, speedup, choice):
    probe.speedup = speedup
    assert resolve_teacher_dtype("auto", "cpu", tmp_path) == choice
    assert resolve_bf16_autocast("auto", "cpu", tmp_path) is (choice == "bfloat16")
    assert teacher_numerics("auto", "cpu", tmp_path) == (
        "bfloat16 matmuls, float32 embedding rows" if choice == "bfloat16" else "float32"
    )


def test_cache_keys_hold_the_precision_auto_resolved_to(probe):
    teacher, train = CheckpointRef("/teacher", "t"), TokensRef("/train.safetensors", "x")
    cfg = DistillConfig(teacher_topk=8)
    keys = {}
    for speedup, resolved in ((2.0, "bfloat16"), (0.5, "float32")):
        precision._PROBES.clear()
        probe.speedup = speedup
        keys[resolved] = topk_cache_key(teacher, cfg, train)
        assert keys[resolved] == topk_cache_key(teacher, cfg.model_copy(update={"teacher_dtype": resolved}), train)
    assert keys["bfloat16"] != keys["float32"]


def test_the_real_timing_gives_both_precisions_a_rate_per_shape(monkeypatch):
    monkeypatch.setattr(precision, "PROBE_SHAPES", ((8, 16, 32), (4, 16, 64)))
    rates = precision._matmul_rates(torch.device("cpu"))
    assert set(rates) == {"8x16x32", "4x16x64"}
    assert all(math.isfinite(r) and r > 0 for shape in rates.values() for r in shape.values())
    assert sorted(next(iter(rates.values()))) == ["bfloat16", "float32"]


def test_the_probe_reads_back_and_refuses_what_is_not_one(probe):
    result = bfloat16_is_faster("cpu")
    assert PrecisionProbe.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    with pytest.raises(ValueError):
        PrecisionProbe.from_dict({**result.to_dict(), "extra": 1})
    (line,) = precision_markdown({"precision_probe": result.to_dict()})
    assert (
        line.startswith("- `auto` precision: bfloat16, by a ")
        and "512 × 640 × 2048: bfloat16 200 vs float32 100" in line
    )
    assert precision_markdown({}) == [] and precision_markdown({"precision_probe": None}) == []


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


@pytest.mark.parametrize("speedup", [2.0, 0.5])
def test_auto_bf16_autocast_trains_as_the_probe_chose_and_records_it(tiny_tokenizer, probe, speedup):
    probe.speedup = speedup
    _, record = _train(tiny_tokenizer, bf16_autocast="auto")
    assert record.bf16_autocast is (speedup > 1)
    assert record.precision_probe == bfloat16_is_faster("cpu").to_dict()
    assert record.precision_probe["gflops"]["512x640x2048"] == {"float32": 100.0, "bfloat16": 100.0 * speedup}
    _, explicit = _train(tiny_tokenizer, bf16_autocast=False)
    assert explicit.bf16_autocast is False and explicit.precision_probe is None  # nothing was left to the probe
    assert probe.calls == 1
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
