"""The activation cache: the same training to the bit as from the live teacher, computed once per
teacher, student and samples, recomputed when an input or a file changes, resumed when killed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tailor.distill.activation_cache import (
    ActivationCache,
    ActivationsRef,
    activation_cache_key,
    uses_activation_cache,
    write_activation_cache,
)
from tailor.distill.trainer import DistillError, distill_checkpoint

# The tiny teacher has 4 layers and the student lacks layer 3: training its last 2 layers leaves a
# 1-layer trunk; "span" is the teacher's residual stream before the final norm.
MIX = {"hidden": 1.0, "span": 0.5, "topk_logits": 0.1}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from unit_data import tiny_distillation_inputs

    root = tmp_path_factory.mktemp("activations")
    base, pruned, cfg, tokens = tiny_distillation_inputs(
        root,
        objective=MIX,
        teacher_topk=8,
        train_last_layers=2,
        freeze_embeddings=True,
        epochs=3,
        checkpoint_every=0,
        teacher_dtype="float32",
    )
    return root, base, pruned, cfg, tokens


def _weights(ref) -> dict[str, torch.Tensor]:
    return load_file(str(Path(ref.path) / "model.safetensors"))


def test_training_from_the_cache_equals_training_from_the_live_teacher_to_the_bit(inputs, tmp_path):
    root, base, pruned, cfg, tokens = inputs
    assert uses_activation_cache(cfg)
    cache = write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path / "activations")
    live_ref, live = distill_checkpoint(base, pruned, cfg, tokens["train"], tmp_path / "live")
    cached_ref, cached = distill_checkpoint(base, pruned, cfg, tokens["train"], tmp_path / "cached", activations=cache)
    assert live.teacher.startswith("live") and cached.teacher.startswith("activation cache")
    assert cached.shared_trunk_layers == live.shared_trunk_layers == 1
    assert cached.losses == live.losses and cached.optimizer_steps == 6
    a, b = _weights(live_ref), _weights(cached_ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((Path(cache.path) / "meta.json").read_text())
    assert meta["plan"]["trunk"] == 1 and (meta["plan"]["span_student"], meta["plan"]["span_teacher"]) == (3, 4)
    assert sorted(p.name for p in Path(cache.path).glob("*.bin")) == [
        "final.bin",
        "span.bin",
        "topk_indices.bin",
        "topk_rest.bin",
        "topk_values.bin",
        "trunk.bin",
    ]


def test_the_cache_is_reused_recomputed_when_edited_and_keyed_by_its_inputs(inputs, tmp_path):
    root, base, pruned, cfg, tokens = inputs
    first = write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path)
    stamp = (Path(first.path) / "trunk.bin").stat().st_mtime_ns
    assert write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path) == first
    assert (Path(first.path) / "trunk.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    # An edited file is found and the cache computed again.
    trunk = Path(first.path) / "trunk.bin"
    data = bytearray(trunk.read_bytes())
    data[100] ^= 0xFF
    trunk.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="was changed since it was written"):
        first.verify()
    again = write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path)
    assert again == first and again.verify() == first
    # Other samples (an edited corpus tokenises to other ones), another student or other
    # targets: another key, so another folder.
    key = activation_cache_key(base, pruned, cfg, tokens["train"], None)
    assert activation_cache_key(base, pruned, cfg, tokens["calibration"], None) != key
    assert activation_cache_key(base, base, cfg, tokens["train"], None) != key
    assert (
        activation_cache_key(base, pruned, cfg.model_copy(update={"objective": "hidden"}), tokens["train"], None) != key
    )
    # The cache refuses samples it was not computed for.
    samples = {k: v[: cfg.num_samples] for k, v in tokens["train"].samples().items()}
    other = {**samples, "input_ids": samples["input_ids"].flip(0)}
    with pytest.raises(ValueError, match="computed for other distillation samples"):
        ActivationCache(first, other)


def test_a_killed_cache_write_continues_at_its_first_missing_batch(inputs, tmp_path):
    root, base, pruned, cfg, tokens = inputs
    seen: list[int] = []

    def killed_after_first_batch(done: int, total: int) -> None:
        seen.append(done)
        if done == cfg.batch_size:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path / "a", on_batch=killed_after_first_batch)
    assert [p.suffix for p in (tmp_path / "a").iterdir()] == [".partial"]  # not taken for a finished cache
    seen.clear()
    resumed = write_activation_cache(
        base, pruned, cfg, tokens["train"], tmp_path / "a", on_batch=lambda done, total: seen.append(done)
    )
    assert seen == [cfg.num_samples]  # only the second batch was computed
    fresh = write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path / "b")
    for name in ("trunk.bin", "final.bin", "span.bin", "topk_values.bin", "topk_indices.bin", "topk_rest.bin"):
        assert (Path(resumed.path) / name).read_bytes() == (Path(fresh.path) / name).read_bytes()


def test_a_cache_of_another_trunk_is_refused(inputs, tmp_path):
    root, base, pruned, cfg, tokens = inputs
    cache = write_activation_cache(base, pruned, cfg, tokens["train"], tmp_path)
    # Training every layer: the cached trunk's layers would be trained, so its states go stale.
    wider = cfg.model_copy(update={"train_last_layers": 3})
    with pytest.raises(DistillError, match="first 1 layers are not this student's frozen layers"):
        distill_checkpoint(base, pruned, wider, tokens["train"], tmp_path / "out", activations=cache)
    assert isinstance(cache, ActivationsRef)
