"""Heal a pruned student by logit distillation from the original (teacher)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .checkpoint import CheckpointRef, existing_checkpoint, load_model, save_model, write_checkpoint
from .config import DataConfig, DistillConfig, TailorError
from .kd_loss import LossSpec, kd_loss_chunked


TRAINING_RECORD = "distill_record.json"


class DistillError(TailorError, RuntimeError):
    """Distillation cannot start or cannot go on."""


def corpus_texts(cfg: DistillConfig, data: DataConfig) -> Iterator[str]:
    """Documents' text: local JSONL files offline, a streamed hub dataset in hub mode."""
    if data.mode == "hub":
        import datasets

        for row in datasets.load_dataset(cfg.corpus, split="train", streaming=True):
            yield row["text"]
        return
    for rel in cfg.corpus_files:
        path = Path(data.data_dir) / rel
        if not path.exists():
            raise DistillError(f"distill.corpus_files: {path} does not exist")
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)["text"]


def check_corpus(cfg: DistillConfig, data: DataConfig) -> None:
    """Fail fast when an offline corpus file is missing or holds no text."""
    if data.mode == "hub":
        return
    for rel in cfg.corpus_files:
        path = Path(data.data_dir) / rel
        if not path.exists():
            raise DistillError(f"distill.corpus_files: {path} does not exist")
    if next(iter(t for t in corpus_texts(cfg, data) if t.strip()), None) is None:
        raise DistillError(f"distill.corpus_files {list(cfg.corpus_files)} hold no text")


def build_samples(tokenizer, texts: Iterable[str], seq_len: int, num_samples: int) -> dict[str, torch.Tensor]:
    """Fixed-length samples: each document cut into ``seq_len`` windows, the last one padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_rows, mask_rows = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for start in range(0, len(ids), seq_len):
            window = ids[start:start + seq_len]
            if len(window) < 2:
                continue
            n = len(window)
            ids_rows.append(window + [pad] * (seq_len - n))
            mask_rows.append([1] * n + [0] * (seq_len - n))
            if len(ids_rows) == num_samples:
                return {"input_ids": torch.tensor(ids_rows), "attention_mask": torch.tensor(mask_rows)}
    if not ids_rows:
        raise DistillError("the distillation corpus produced no samples (empty corpus?)")
    return {"input_ids": torch.tensor(ids_rows), "attention_mask": torch.tensor(mask_rows)}


def _final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state


def distill(teacher, student, samples: dict[str, torch.Tensor], cfg: DistillConfig,
            on_step: Callable[[int, float], None] | None = None, resume_file: Path | None = None) -> dict:
    """Train ``student`` in place; returns losses per optimiser step and throughput.

    With ``resume_file``, the student, optimiser, RNG state and data position are saved
    there (write, then rename) every ``cfg.checkpoint_every`` optimiser steps, and a run
    that finds the file continues from it: on CPU with the same seed the final weights
    equal an uninterrupted run's.
    """
    if teacher.config.vocab_size != student.config.vocab_size:
        raise DistillError(f"student vocabulary ({student.config.vocab_size}) differs from the "
                           f"teacher's ({teacher.config.vocab_size}); logit distillation needs the same one")
    teacher.eval().requires_grad_(False)
    student.train()
    optimizer = _adamw(student, cfg)
    # Position of the next micro-batch and everything counted so far.
    progress = {"epoch": 0, "batch": 0, "losses": [], "micro": 0, "tokens": 0, "seconds": 0.0, "resumed_at": 0}
    if resume_file is not None and resume_file.exists():
        saved = torch.load(resume_file, weights_only=False)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
        progress = {**saved["progress"], "resumed_at": len(saved["progress"]["losses"])}
    else:
        torch.manual_seed(cfg.seed)
    spec = loss_spec(cfg)
    n = samples["input_ids"].shape[0]
    batches_per_epoch = -(-n // cfg.batch_size)
    losses: list[float] = progress["losses"]
    window: list[float] = []  # losses of the micro-batches since the last optimiser step
    start = time.perf_counter() - progress["seconds"]
    for epoch in range(progress["epoch"], cfg.epochs):
        order = list(range(n))
        random.Random(cfg.seed + epoch).shuffle(order)
        first = progress["batch"] if epoch == progress["epoch"] else 0
        for batch in range(first, batches_per_epoch):
            idx = order[batch * cfg.batch_size:(batch + 1) * cfg.batch_size]
            ids = samples["input_ids"][idx].to(student.device)
            mask = samples["attention_mask"][idx].to(student.device)
            with torch.no_grad():
                t_hidden = _final_hidden(teacher, ids, mask)
            s_hidden = _final_hidden(student, ids, mask)
            loss = kd_loss_chunked(student, teacher, s_hidden, t_hidden, mask, ids, spec, cfg.loss_chunk_tokens)
            if not math.isfinite(loss.item()):
                raise DistillError(f"non-finite distillation loss at optimiser step {len(losses) + 1} "
                                   f"(epoch {epoch + 1}); check distill.learning_rate and distill.temperature")
            (loss / cfg.grad_accum).backward()
            window.append(loss.item())
            progress["tokens"] += int(mask.sum())
            progress["micro"] += 1
            last_batch = epoch == cfg.epochs - 1 and batch == batches_per_epoch - 1
            if len(window) < cfg.grad_accum and not last_batch:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise DistillError(f"non-finite gradient norm at optimiser step {len(losses) + 1} "
                                   f"(epoch {epoch + 1}); check distill.learning_rate and distill.temperature")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(sum(window) / len(window))
            window = []
            progress.update(epoch=epoch, batch=batch + 1, seconds=time.perf_counter() - start)
            if resume_file is not None and cfg.checkpoint_every and len(losses) % cfg.checkpoint_every == 0:
                _save_resume_state(resume_file, student, optimizer, progress)
            if on_step is not None:
                on_step(len(losses), losses[-1])
    elapsed = time.perf_counter() - start
    student.eval()
    return {"losses": losses, "optimizer_steps": len(losses), "micro_batches": progress["micro"],
            "train_tokens": progress["tokens"], "train_seconds": elapsed,
            "train_tokens_per_s": progress["tokens"] / elapsed, "num_samples": n,
            "resumed_at_step": progress["resumed_at"],
            "loss": {"kind": spec.kind, "temperature": spec.temperature, "alpha": spec.alpha, "book": spec.book}}


def _adamw(student, cfg: DistillConfig) -> torch.optim.AdamW:
    # The fused kernel updates in place; the default multi-tensor path allocates
    # parameter-sized temporaries (another ~1 GB for gemma-3-270m).
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(student.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(student.parameters(), **kwargs)


def loss_spec(cfg: DistillConfig) -> LossSpec:
    return LossSpec(temperature=cfg.temperature, kind=cfg.loss, alpha=cfg.alpha, jsd_beta=cfg.jsd_beta,
                    book=cfg.book_loss)


def _save_resume_state(path: Path, student, optimizer, progress: dict) -> None:
    # Write then rename: a kill during the write leaves the previous state intact.
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "progress": progress}, tmp)
    tmp.replace(path)


def distill_checkpoint(teacher_ref: CheckpointRef, student_ref: CheckpointRef, cfg: DistillConfig,
                       data: DataConfig, out_dir: Path,
                       on_step: Callable[[int, float], None] | None = None) -> tuple[CheckpointRef, dict]:
    """Distil the student checkpoint from the teacher checkpoint and save the result."""
    if (done := existing_checkpoint(out_dir)) is not None:
        return done, json.loads((Path(done.path) / TRAINING_RECORD).read_text())
    teacher, _ = load_model(teacher_ref)
    student, tokenizer = load_model(student_ref)
    samples = build_samples(tokenizer, corpus_texts(cfg, data), cfg.seq_len, cfg.num_samples)

    resume_file = out_dir.with_name(out_dir.name + ".resume.pt")

    def train_and_save(tmp: Path) -> None:
        record = distill(teacher, student, samples, cfg, on_step, resume_file)
        save_model(student, tokenizer, tmp)
        (tmp / TRAINING_RECORD).write_text(json.dumps(record))

    ref = write_checkpoint(out_dir, train_and_save)
    resume_file.unlink(missing_ok=True)
    return ref, json.loads((Path(ref.path) / TRAINING_RECORD).read_text())
