"""Heal a pruned student by logit distillation from the original (teacher)."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import (CheckpointRef, check_checkpoint_target, existing_checkpoint, load_model, save_model, stable_hash, write_checkpoint,
                         write_file_atomically)
from .config import DataConfig, DistillConfig, TailorError
from .corpus import heldout_samples, training_samples
from .kd_loss import LossCounts, LossSpec, TopKTeacher, kd_loss_chunked, kd_loss_topk
from .perplexity import heldout_perplexity
from .precision import final_hidden, load_teacher, resolve_bf16_autocast, teacher_numerics
from .teacher_cache import load_topk_cache


TRAINING_RECORD = "distill_record.json"


class DistillError(TailorError, RuntimeError):
    """Distillation cannot start or cannot go on."""


def distill(teacher, student, samples: dict[str, torch.Tensor], cfg: DistillConfig,
            on_step: Callable[[int, float], None] | None = None, resume_file: Path | None = None,
            topk: TopKTeacher | None = None, heldout: dict[str, dict[str, torch.Tensor]] | None = None,
            on_heldout: Callable[[int, float], None] | None = None) -> dict:
    """Train ``student`` in place; returns losses per optimiser step and throughput.

    The teacher is either a live model or, with ``topk``, its cached top-k logits for these
    samples (``teacher`` may then be None). With ``resume_file``, the student, optimiser,
    scheduler, RNG state and data position are saved there (write, then rename) every
    ``cfg.checkpoint_every`` optimiser steps, and a run that finds the file continues from
    it: on CPU with the same seed the final weights equal an uninterrupted run's.

    Under ``torchrun`` (an initialised process group) each rank takes its share of every
    global batch of ``batch_size x world_size`` samples, normalises its loss by the global
    batch's token counts, and gradients are summed across ranks before each optimiser
    step, so the update equals one process's on the global batch; only rank 0 writes the
    resume state.

    With ``heldout`` samples, the student's held-out perplexity is taken before the first
    step, every ``cfg.heldout_every`` optimiser steps and after the last (the healing
    curve, ``on_heldout(step, perplexity)``).
    """
    if topk is None and teacher.config.vocab_size != student.config.vocab_size:
        raise DistillError(f"student vocabulary ({student.config.vocab_size}) differs from the "
                           f"teacher's ({teacher.config.vocab_size}); logit distillation needs the same one")
    rank, world = _process_group()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    trainable = select_trainable(student, cfg)
    student.train()
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    sparse_lookup = _sparse_tied_embedding_gradient(student, True)
    autocast = resolve_bf16_autocast(cfg.bf16_autocast, student.device)
    optimizer = _adamw(trainable, cfg)
    n = samples["input_ids"].shape[0]
    global_batch = cfg.batch_size * world
    batches_per_epoch = -(-n // global_batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, planned_steps(cfg, n, world)))
    # Position of the next micro-batch and everything counted so far.
    progress = {"epoch": 0, "batch": 0, "losses": [], "micro": 0, "tokens": 0, "seconds": 0.0, "resumed_at": 0}
    if resume_file is not None and resume_file.exists():
        saved = torch.load(resume_file, weights_only=True)
        student.load_state_dict(saved["student"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        progress = {**saved["progress"], "resumed_at": len(saved["progress"]["losses"])}
    else:
        torch.manual_seed(cfg.seed)
    curve: list[list[float]] = progress.setdefault("heldout_curve", [])
    clock = {"start": None}  # training time starts after the first curve point

    def score_heldout(step: int) -> None:
        """One point of the healing curve; its time is kept out of the training time."""
        if heldout and rank == 0 and not any(s == step for s, _ in curve):
            began = time.perf_counter()
            ppl = heldout_perplexity(student, heldout)["perplexity"]
            curve.append([step, ppl])
            if clock["start"] is not None:
                clock["start"] += time.perf_counter() - began
            if on_heldout is not None:
                on_heldout(step, ppl)

    score_heldout(len(progress["losses"]))
    spec = loss_spec(cfg)
    losses: list[float] = progress["losses"]
    window: list[float] = []  # losses of the micro-batches since the last optimiser step
    clock["start"] = time.perf_counter() - progress["seconds"]
    for epoch in range(progress["epoch"], cfg.epochs):
        order = list(range(n))
        random.Random(cfg.seed + epoch).shuffle(order)
        first = progress["batch"] if epoch == progress["epoch"] else 0
        for batch in range(first, batches_per_epoch):
            idx = order[batch * global_batch:(batch + 1) * global_batch][rank::world]
            counts = _batch_counts(samples, idx, spec, world)
            loss_value = 0.0
            if idx:
                loss = _micro_batch_loss(teacher, student, samples, idx, spec, cfg, topk, counts, autocast)
                (loss / cfg.grad_accum).backward()
                loss_value = loss.item()
                progress["tokens"] += int(samples["attention_mask"][idx].sum())
            if world > 1:  # every rank holds its share of the global loss
                loss_value = _all_sum(loss_value)
            if not math.isfinite(loss_value):
                raise DistillError(f"non-finite distillation loss at optimiser step {len(losses) + 1} "
                                   f"(epoch {epoch + 1}); check distill.learning_rate and distill.temperature")
            window.append(loss_value)
            progress["micro"] += 1
            last_batch = epoch == cfg.epochs - 1 and batch == batches_per_epoch - 1
            if progress["micro"] % cfg.grad_accum and not last_batch:
                continue
            if world > 1:
                _sum_gradients(student)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise DistillError(f"non-finite gradient norm at optimiser step {len(losses) + 1} "
                                   f"(epoch {epoch + 1}); check distill.learning_rate and distill.temperature")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(sum(window) / max(len(window), 1))
            window = []
            if cfg.heldout_every and len(losses) % cfg.heldout_every == 0:
                score_heldout(len(losses))
            progress.update(epoch=epoch, batch=batch + 1, seconds=time.perf_counter() - clock["start"])
            if resume_file is not None and rank == 0 and cfg.checkpoint_every \
                    and len(losses) % cfg.checkpoint_every == 0:
                _save_resume_state(resume_file, student, optimizer, scheduler, progress)
            if on_step is not None:
                on_step(len(losses), losses[-1])
    elapsed = time.perf_counter() - clock["start"]
    score_heldout(len(losses))
    student.eval()
    if cfg.gradient_checkpointing:
        student.activation_checkpointing_disable()
    _sparse_tied_embedding_gradient(student, sparse_lookup)
    student.requires_grad_(True)
    tokens = progress["tokens"]
    if world > 1:
        if not _ranks_in_sync(student):
            raise DistillError("data-parallel ranks ended with different student weights")
        tokens = int(_all_sum(tokens))
    return {"losses": losses, "optimizer_steps": len(losses), "micro_batches": progress["micro"],
            "train_tokens": tokens, "train_seconds": elapsed,
            "train_tokens_per_s": tokens / elapsed, "num_samples": n,
            "resumed_at_step": progress["resumed_at"], "world_size": world,
            "final_learning_rate": scheduler.get_last_lr()[0],
            "teacher": (f"cached top-{cfg.teacher_topk}" if topk is not None
                        else f"live ({teacher_numerics(cfg.teacher_dtype, student.device)})"),
            "gradient_checkpointing": cfg.gradient_checkpointing, "bf16_autocast": autocast,
            "trainable_parameters": sum(p.numel() for p in trainable), "heldout_curve": curve,
            "loss": {"kind": spec.kind, "temperature": spec.temperature, "alpha": spec.alpha, "book": spec.book}}


def select_trainable(student, cfg: DistillConfig) -> list[torch.nn.Parameter]:
    """Freeze what the recipe keeps fixed (the tied embedding, the early layers); the rest trains."""
    layers = student.get_decoder().layers
    if cfg.train_last_layers > len(layers):
        raise DistillError(f"distill.train_last_layers={cfg.train_last_layers} exceeds the student's "
                           f"{len(layers)} decoder layers; allowed: 0 (all) to {len(layers)}")
    student.requires_grad_(True)
    if cfg.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    if cfg.train_last_layers:
        for layer in layers[:len(layers) - cfg.train_last_layers]:
            layer.requires_grad_(False)
    return [p for p in student.parameters() if p.requires_grad]


def _sparse_tied_embedding_gradient(student, on: bool) -> bool:
    """Let the input lookup's gradient be sparse where the weight is tied to the output head.

    The head's dense gradient arrives too, so the sum autograd stores is dense as ever, but
    the lookup no longer builds a dense vocabulary-sized gradient of its own (640 MiB of
    mostly zeros for gemma-3-270m, per micro-batch). Returns whether it was sparse already.
    """
    lookup, head = student.get_input_embeddings(), student.get_output_embeddings()
    before = bool(lookup.sparse)
    if head is not None and head.weight is lookup.weight:
        lookup.sparse = on
    return before


def _micro_batch_loss(teacher, student, samples: dict[str, torch.Tensor], idx: list[int], spec: LossSpec,
                      cfg: DistillConfig, topk: TopKTeacher | None, counts: LossCounts,
                      autocast: bool) -> torch.Tensor:
    ids = samples["input_ids"][idx].to(student.device)
    mask = samples["attention_mask"][idx].to(student.device)
    s_hidden = final_hidden(student, ids, mask, autocast=autocast)
    matmuls = torch.bfloat16 if autocast else torch.float32  # the student's output head
    if topk is not None:
        rows = torch.tensor(idx)
        batch_topk = TopKTeacher(topk.values[rows], topk.indices[rows], topk.rest_logsumexp[rows], topk.temperature)
        return kd_loss_topk(student, s_hidden, batch_topk, mask, ids, spec, cfg.loss_chunk_tokens, counts, matmuls)
    with torch.no_grad():
        t_hidden = final_hidden(teacher, ids.to(teacher.device), mask.to(teacher.device)).to(student.device)
    return kd_loss_chunked(student, teacher, s_hidden, t_hidden, mask, ids, spec, cfg.loss_chunk_tokens, counts,
                           matmuls)


def _batch_counts(samples: dict[str, torch.Tensor], idx: list[int], spec: LossSpec, world: int) -> LossCounts:
    """The micro-batch's loss counts; in a process group, the whole global batch's."""
    if idx:
        local = LossCounts.of(samples["attention_mask"][idx], samples["input_ids"][idx], spec)
    else:
        local = LossCounts(0, 0, 0)
    if world == 1:
        return local
    import torch.distributed as dist

    totals = torch.tensor([local.tokens, local.targets, local.sequences], dtype=torch.float64)
    dist.all_reduce(totals)
    return LossCounts(*(int(v) for v in totals))


def _ranks_in_sync(model) -> bool:
    """Every rank holds bit-identical weights (compared through a float64 checksum)."""
    import torch.distributed as dist

    with torch.no_grad():
        checksum = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                for p in model.parameters()]).sum(0)
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _all_sum(value: float) -> float:
    import torch.distributed as dist

    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def planned_steps(cfg: DistillConfig, num_samples: int, world: int = 1) -> int:
    """Optimiser steps of a whole run (accumulation windows run across epoch boundaries)."""
    micro_batches = cfg.epochs * -(-num_samples // (cfg.batch_size * world))
    return max(1, -(-micro_batches // cfg.grad_accum))


def lr_factor(cfg: DistillConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate before optimiser step ``step`` (0-based)."""
    warmup = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_schedule == "cosine":
            done = (step - warmup) / max(1, total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 1.0

    return factor


def _process_group() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_gradients(model) -> None:
    """All-reduce (sum) every gradient as one flat buffer; a rank without data contributes zeros.

    Each rank's loss is already normalised by the global batch's counts, so the sum is the
    single-process gradient.
    """
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def _adamw(params: list[torch.nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    # The fused kernel updates in place; the default multi-tensor path allocates
    # parameter-sized temporaries (another ~1 GB for gemma-3-270m).
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def loss_spec(cfg: DistillConfig) -> LossSpec:
    return LossSpec(temperature=cfg.temperature, kind=cfg.loss, alpha=cfg.alpha, jsd_beta=cfg.jsd_beta,
                    book=cfg.book_loss)


def _save_resume_state(path: Path, student, optimizer, scheduler, progress: dict) -> None:
    state = {"student": student.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "progress": progress}
    write_file_atomically(path, lambda tmp: torch.save(state, tmp))


def distill_checkpoint(teacher_ref: CheckpointRef, student_ref: CheckpointRef, cfg: DistillConfig,
                       data: DataConfig, out_dir: Path,
                       on_step: Callable[[int, float], None] | None = None,
                       topk_cache: Path | None = None, device: str = "cpu",
                       on_heldout: Callable[[int, float], None] | None = None) -> tuple[CheckpointRef, dict]:
    """Distil the student checkpoint from the teacher checkpoint (or its top-k cache) and save the result.

    In a process group every rank trains; rank 0 writes the checkpoint and the others wait for it.
    """
    if (done := existing_checkpoint(out_dir)) is not None:
        return done, training_record(done)
    check_checkpoint_target(out_dir)
    student, tokenizer = load_model(student_ref, device=device)
    samples = training_samples(tokenizer, cfg, data)
    heldout = heldout_samples(tokenizer, cfg, data) if cfg.heldout_docs else None
    if topk_cache is not None:
        teacher, topk = None, load_topk_cache(topk_cache, samples, cfg)
    else:
        teacher, topk = load_teacher(teacher_ref, cfg.teacher_dtype, samples["input_ids"], device), None
    resume_file = resume_path(out_dir, cfg, teacher_ref, student_ref, topk_cache, _process_group()[1])
    rank, world = _process_group()
    if rank != 0:
        distill(teacher, student, samples, cfg, None, resume_file, topk)
        _barrier(world)
        done = existing_checkpoint(out_dir)
        return done, training_record(done)

    def train_and_save(tmp: Path) -> None:
        record = distill(teacher, student, samples, cfg, on_step, resume_file, topk, heldout, on_heldout)
        save_model(student, tokenizer, tmp)
        (tmp / TRAINING_RECORD).write_text(json.dumps(record))

    ref = write_checkpoint(out_dir, train_and_save)
    resume_file.unlink(missing_ok=True)
    _barrier(world)
    return ref, training_record(ref)


def training_record(ref: CheckpointRef) -> dict:
    """The training record a distilled checkpoint folder keeps beside its weights."""
    return json.loads((Path(ref.path) / TRAINING_RECORD).read_text())


def resume_path(out_dir: Path, cfg: DistillConfig, teacher_ref: CheckpointRef, student_ref: CheckpointRef,
                topk_cache: Path | None, world: int) -> Path:
    """Where a distillation keeps its resumable state: keyed by everything the training depends
    on (settings, both checkpoints, the teacher cache, the number of processes), so a different
    run never resumes from it."""
    key = stable_hash(cfg.model_dump(), teacher_ref.fingerprint, student_ref.fingerprint, str(topk_cache), world)
    return out_dir.with_name(f"{out_dir.name}.resume-{key}.pt")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
