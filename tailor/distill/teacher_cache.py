"""The teacher's top-k logits for every distillation sample, computed once and stored on disk.

Training from the cache needs no teacher forward pass and no teacher in memory, for
every epoch and every later run with the same teacher, samples, k and temperature.
A cache file holds the samples' token ids, so a student is never trained against
logits of other text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tailor.config.settings import DistillConfig, TailorError
from tailor.data.tokenised import TokensRef
from tailor.distill.kd_loss import TopKTeacher
from tailor.models.heads import output_logits
from tailor.models.precision import (
    bfloat16_autocast,
    final_hidden,
    has_bfloat16_matmuls,
    load_teacher,
    teacher_numerics,
)
from tailor.store.checkpoint import CheckpointRef, stable_hash
from tailor.store.digested import is_intact, write_digested


class TeacherCacheError(TailorError, ValueError):
    """The cache does not fit the run."""


def check_topk(k: int, vocab_size: int) -> None:
    if not 1 <= k <= vocab_size:
        raise TeacherCacheError(
            f"distill.teacher_topk must be between 1 and the vocabulary size ({vocab_size}), got {k}"
        )


@torch.no_grad()
def compute_topk(
    teacher, samples: dict[str, torch.Tensor], k: int, temperature: float, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Top-k logits (float16), their token ids (int32) and the rest's log-sum-exp, per position."""
    check_topk(k, teacher.config.vocab_size)
    parts: list[TopKTeacher] = []
    ids, mask = samples["input_ids"], samples["attention_mask"]
    for start in range(0, ids.shape[0], batch_size):
        hidden = final_hidden(
            teacher,
            ids[start : start + batch_size].to(teacher.device),
            mask[start : start + batch_size].to(teacher.device),
        )
        # One sequence at a time through the head: [seq_len, V] logits, never [B, T, V].
        for row in hidden:
            with bfloat16_autocast(has_bfloat16_matmuls(teacher), row.device):
                logits = output_logits(teacher, row)
            parts.append(TopKTeacher.from_logits(logits, k, temperature))
    return {
        "input_ids": ids,
        "values": torch.stack([p.values for p in parts]).cpu(),
        "indices": torch.stack([p.indices for p in parts]).cpu(),
        "rest_logsumexp": torch.stack([p.rest_logsumexp for p in parts]).cpu(),
        "k": torch.tensor(k),
        "temperature": torch.tensor(temperature),
    }


def topk_cache_key(
    teacher_ref: CheckpointRef, cfg: DistillConfig, train: TokensRef, probe_dir: Path | None = None
) -> str:
    """What the cache depends on: the teacher's fingerprint and precision (as ``auto`` resolves on
    this machine, ``probe_dir`` as in ``bfloat16_is_faster``), the training tokens, k and T."""
    return stable_hash(
        teacher_ref.fingerprint,
        cfg.teacher_topk,
        cfg.temperature,
        teacher_numerics(cfg.teacher_dtype, "cpu", probe_dir),
        train.fingerprint,
    )


def write_topk_cache(
    teacher_ref: CheckpointRef, cfg: DistillConfig, train: TokensRef, out_dir: Path, probe_dir: Path | None = None
) -> Path:
    """Compute and store the cache under ``out_dir`` with its sha256 recorded; an existing file
    is reused while it still matches that record (an edited or truncated one is computed again)."""
    key = topk_cache_key(teacher_ref, cfg, train, probe_dir)
    path = Path(out_dir) / f"teacher-top{cfg.teacher_topk}-{key}.pt"
    if is_intact(path):
        return path
    samples = train.samples()
    teacher = load_teacher(teacher_ref, cfg.teacher_dtype, samples["input_ids"], probe_dir=probe_dir)
    check_topk(cfg.teacher_topk, teacher.config.vocab_size)
    cache = compute_topk(teacher, samples, cfg.teacher_topk, cfg.temperature, cfg.batch_size)
    write_digested(path, lambda tmp: torch.save(cache, tmp))
    return path


def load_topk_cache(path: Path, samples: dict[str, torch.Tensor], cfg: DistillConfig) -> TopKTeacher:
    """The cache as a ``TopKTeacher`` over [N, seq_len] positions, checked against the run's samples."""
    cache = torch.load(path, weights_only=True)
    if not torch.equal(cache["input_ids"], samples["input_ids"]):
        raise TeacherCacheError(f"{path} was computed for other distillation samples")
    if int(cache["k"]) != cfg.teacher_topk or float(cache["temperature"]) != cfg.temperature:
        raise TeacherCacheError(
            f"{path} holds k={int(cache['k'])}, T={float(cache['temperature'])}; "
            f"the run asks k={cfg.teacher_topk}, T={cfg.temperature}"
        )
    return TopKTeacher(cache["values"], cache["indices"], cache["rest_logsumexp"], cfg.temperature)
