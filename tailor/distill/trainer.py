"""Heal a pruned student by distillation from the original (teacher): its logits or its final hidden state."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from tailor.config.settings import DistillConfig, TailorError
from tailor.data.tokenised import TokensRef
from tailor.distill.activation_cache import ActivationCache, ActivationsRef
from tailor.distill.kd_loss import LossCounts, TopKTeacher
from tailor.distill.objectives import Objective, StudentStates, Targets, build_objective, objective_needs
from tailor.distill.record import TrainingProgress, TrainingRecord, training_record, write_training_record
from tailor.distill.targets import TargetPlan, plan_targets, span_depths, teacher_targets, trunk_digest
from tailor.distill.teacher_cache import load_topk_cache
from tailor.evaluate.perplexity import heldout_perplexity
from tailor.models.precision import (
    bfloat16_autocast,
    bfloat16_is_faster,
    final_hidden,
    load_teacher,
    resolve_bf16_autocast,
    teacher_numerics,
)
from tailor.prune.linear_map import fit_linear_map
from tailor.prune.pruning import replace_removed_block
from tailor.prune.trunk import decoder_layers, shared_prefix, tail_hidden, tail_model
from tailor.store.checkpoint import (
    CheckpointRef,
    check_checkpoint_target,
    existing_checkpoint,
    intact_checkpoint,
    load_model,
    save_model,
    stable_hash,
    write_checkpoint,
    write_file_atomically,
)


class DistillError(TailorError, RuntimeError):
    """Distillation cannot start or cannot go on."""


class Distiller:
    """Distil ``teacher`` into ``student`` in place: ``setup``, ``step`` per optimiser step, ``teardown``.

    ``fit()`` runs the whole lifecycle and returns the training record (losses per optimiser
    step, throughput, the healing curve). The teacher is either a live model or, with
    ``topk``, its cached top-k logits for these samples, or, with ``activations``, its targets
    and the shared trunk's output for these samples (``teacher`` may then be None).

    ``span``: the (student, teacher) depths of the removed block's end for the ``span``
    objective, taken before a layer was added or a map folded into the student
    (``span_depths``); by default taken from ``student`` and ``teacher`` as given.

    With ``resume_file``, ``state_dict()`` (student, optimiser, scheduler, RNG state and data
    position) is saved there, write then rename, every ``cfg.checkpoint_every`` optimiser
    steps, and a run that finds the file continues from it: on CPU with the same seed the
    final weights equal an uninterrupted run's.

    Under ``torchrun`` (an initialised process group) the student trains inside
    ``DistributedDataParallel``: each rank takes its share of every global batch of
    ``batch_size x world_size`` samples and normalises its loss by the global batch's token
    counts, so the gradient DDP reduces equals one process's on the global batch; only rank
    0 writes the resume state.

    With ``heldout`` samples, the student's held-out perplexity is taken before the first
    step, every ``cfg.heldout_every`` optimiser steps and after the last (the healing curve,
    ``on_heldout(step, perplexity)``).

    ``auto`` precisions resolve by ``bfloat16_is_faster`` on the student's device, its answer
    kept in ``probe_dir``; the record then holds the probe's figures (``precision_probe``).
    """

    def __init__(
        self,
        teacher,
        student,
        samples: dict[str, torch.Tensor],
        cfg: DistillConfig,
        *,
        topk: TopKTeacher | None = None,
        activations: ActivationCache | None = None,
        span: tuple[int, int] | None = None,
        heldout: dict[str, dict[str, torch.Tensor]] | None = None,
        resume_file: Path | None = None,
        on_step: Callable[[int, float], None] | None = None,
        on_heldout: Callable[[int, float], None] | None = None,
        share_trunk: bool = True,
        probe_dir: Path | None = None,
    ) -> None:
        if (
            topk is None
            and "logits" in cfg.objective_weights()
            and teacher.config.vocab_size != student.config.vocab_size
        ):
            raise DistillError(
                f"student vocabulary ({student.config.vocab_size}) differs from the "
                f"teacher's ({teacher.config.vocab_size}); logit distillation needs the same one"
            )
        self.teacher, self.student, self.samples, self.cfg = teacher, student, samples, cfg
        self.topk, self.heldout, self.resume_file = topk, heldout, resume_file
        self.activations, self.span = activations, span
        self.plan: TargetPlan | None = None  # which teacher signals each batch needs, and from where
        self.on_step, self.on_heldout = on_step, on_heldout
        self.share_trunk = share_trunk
        self.probe_dir = probe_dir
        self.probe = None  # the precision probe, when an ``auto`` setting was resolved by it
        self.trunk = 0  # decoder layers the student shares with the teacher and does not train
        self.rank, self.world = _process_group()
        self.num_samples = samples["input_ids"].shape[0]
        self.batches_per_epoch = -(-self.num_samples // (cfg.batch_size * self.world))
        self.progress = TrainingProgress()
        self.model = None  # what forward and backward run through: the decoder, or its DDP wrapper
        self._started = 0.0  # perf_counter of training start, less the seconds of earlier sessions

    # -- lifecycle ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Freeze what the recipe keeps fixed, build the optimiser, resume, wrap for data parallelism."""
        cfg, student = self.cfg, self.student
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
        self.trainable = select_trainable(student, cfg)
        student.train()
        if cfg.gradient_checkpointing:
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.autocast = resolve_bf16_autocast(cfg.bf16_autocast, student.device, self.probe_dir)
        if cfg.bf16_autocast == "auto" or (
            self.topk is None and self.activations is None and cfg.teacher_dtype == "auto"
        ):
            self.probe = bfloat16_is_faster(student.device, self.probe_dir)
        # The student's output-head matmuls (logit objectives) follow its autocast setting.
        self.objective = build_objective(cfg, torch.bfloat16 if self.autocast else torch.float32)
        self.optimizer = _adamw(self.trainable, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(cfg, planned_steps(cfg, self.num_samples, self.world))
        )
        if self.resume_file is not None and self.resume_file.exists():
            self.load_state_dict(torch.load(self.resume_file, weights_only=True))
        else:
            torch.manual_seed(cfg.seed)
        self.plan = self._plan()
        self.trunk = self.plan.trunk
        span_layer = decoder_layers(student)[self.plan.span_student - 1] if self.plan.span_student else None
        self.model = _FinalHidden(student, self.autocast, self.trunk, span_layer)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # DDP averages gradients over ranks; step() scales each rank's loss by the world
            # size so the average is the sum of the global batch's normalised shares.
            self.model = DistributedDataParallel(self.model, gradient_as_bucket_view=True, broadcast_buffers=False)
        # After wrapping: DDP would expect a sparse gradient from a sparse lookup, but the tied
        # head's dense gradient is summed into it before any hook sees it. Without the head (a
        # hidden-state objective) the lookup's gradient would stay sparse, which neither gradient
        # clipping nor the fused AdamW accepts: it stays dense.
        self._sparse_before = _sparse_tied_embedding_gradient(student, self.objective.uses_output_head)
        if self.progress.steps == 0:  # a resumed run's curve already holds the points its schedule asked for
            self._score_heldout(0)
        self._started = time.perf_counter() - self.progress.seconds

    def fit(self) -> TrainingRecord:
        """The whole run: setup, every remaining optimiser step, teardown; returns the record."""
        self.setup()
        for window in self.windows():
            self.step(window)
        return self.teardown()

    def windows(self) -> Iterator[list[tuple[int, int, list[int]]]]:
        """The remaining gradient-accumulation windows, from the saved data position.

        Each is a list of micro-batches (epoch, batch, this rank's sample indices); windows
        run across epoch boundaries, and the last one of a run may be short.
        """
        cfg, progress, window = self.cfg, self.progress, []
        global_batch = cfg.batch_size * self.world
        micro = progress.micro
        for epoch in range(progress.epoch, cfg.epochs):
            order = list(range(self.num_samples))
            random.Random(cfg.seed + epoch).shuffle(order)
            first = progress.batch if epoch == progress.epoch else 0
            for batch in range(first, self.batches_per_epoch):
                shard = order[batch * global_batch : (batch + 1) * global_batch][self.rank :: self.world]
                window.append((epoch, batch, shard))
                micro += 1
                last = epoch == cfg.epochs - 1 and batch == self.batches_per_epoch - 1
                if micro % cfg.grad_accum == 0 or last:
                    yield window
                    window = []

    def step(self, window: list[tuple[int, int, list[int]]]) -> float:
        """One optimiser step over an accumulation window; returns its mean loss."""
        cfg, progress, losses = self.cfg, self.progress, self.progress.losses
        micro_losses = []
        for i, (epoch, _, idx) in enumerate(window):
            # Gradients are reduced across ranks once per window, on its last backward.
            sync = i == len(window) - 1 or self.world == 1
            with contextlib.nullcontext() if sync else self.model.no_sync():
                value = self._micro_batch(idx)
            if not math.isfinite(value):
                raise DistillError(
                    f"non-finite distillation loss at optimiser step {len(losses) + 1} "
                    f"(epoch {epoch + 1}); check distill.learning_rate and distill.temperature"
                )
            micro_losses.append(value)
        progress.micro += len(window)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            raise DistillError(
                f"non-finite gradient norm at optimiser step {len(losses) + 1} "
                f"(epoch {window[-1][0] + 1}); check distill.learning_rate and distill.temperature"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        losses.append(sum(micro_losses) / len(micro_losses))
        progress.grad_norms.append(float(grad_norm))
        if cfg.heldout_every and len(losses) % cfg.heldout_every == 0:
            self._score_heldout(len(losses))
        epoch, batch, _ = window[-1]
        progress.epoch, progress.batch, progress.seconds = epoch, batch + 1, time.perf_counter() - self._started
        if (
            self.resume_file is not None
            and self.rank == 0
            and cfg.checkpoint_every
            and len(losses) % cfg.checkpoint_every == 0
        ):
            state = self.state_dict()
            write_file_atomically(self.resume_file, lambda tmp: torch.save(state, tmp))
        if self.on_step is not None:
            self.on_step(len(losses), losses[-1])
        return losses[-1]

    def teardown(self) -> TrainingRecord:
        """The last curve point, the student back in eval mode as it came; returns the record."""
        cfg, student, progress = self.cfg, self.student, self.progress
        elapsed = time.perf_counter() - self._started
        self._score_heldout(progress.steps)
        student.eval()
        if cfg.gradient_checkpointing:
            student.activation_checkpointing_disable()
        _sparse_tied_embedding_gradient(student, self._sparse_before)
        student.requires_grad_(True)
        tokens = progress.tokens
        if self.world > 1:
            if not _ranks_in_sync(student):
                raise DistillError("data-parallel ranks ended with different student weights")
            tokens = int(_all_sum(tokens))
        return TrainingRecord(
            losses=progress.losses,
            grad_norms=progress.grad_norms,
            optimizer_steps=progress.steps,
            micro_batches=progress.micro,
            train_tokens=tokens,
            train_seconds=elapsed,
            train_tokens_per_s=tokens / elapsed,
            num_samples=self.num_samples,
            resumed_at_step=progress.resumed_at,
            world_size=self.world,
            final_learning_rate=self.scheduler.get_last_lr()[0],
            teacher=(
                f"cached top-{cfg.teacher_topk}"
                if self.topk is not None
                else f"{'activation cache' if self.activations is not None else 'live'} "
                f"({teacher_numerics(cfg.teacher_dtype, student.device, self.probe_dir)})"
            ),
            gradient_checkpointing=cfg.gradient_checkpointing,
            bf16_autocast=self.autocast,
            trainable_parameters=sum(p.numel() for p in self.trainable),
            shared_trunk_layers=self.trunk,
            heldout_curve=progress.heldout_curve,
            loss=self.objective.describe(),
            precision_probe=self.probe.to_dict() if self.probe is not None else None,
        )

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a resumed run needs (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "progress": self.progress.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.progress = TrainingProgress.from_state_dict(state["progress"])
        self.progress.resumed_at = self.progress.steps

    # -- internals ----------------------------------------------------------------------------

    def _micro_batch(self, idx: list[int]) -> float:
        """Forward and backward of this rank's share of a global batch; returns the global batch's loss."""
        counts = _batch_counts(self.samples, idx, self.objective, self.world)
        # A rank whose share is empty (the last global batch of an epoch) still joins DDP's
        # reduction, with a zero-weighted loss on one sample.
        loss = self._loss(idx or [0], counts) * (1.0 if idx else 0.0)
        (loss * (self.world / self.cfg.grad_accum)).backward()
        if idx:
            self.progress.tokens += int(self.samples["attention_mask"][idx].sum())
        value = loss.item()
        return _all_sum(value) if self.world > 1 else value  # every rank holds its share of the loss

    def _loss(self, idx: list[int], counts: LossCounts) -> torch.Tensor:
        student, samples = self.student, self.samples
        ids = samples["input_ids"][idx].to(student.device)
        mask = samples["attention_mask"][idx].to(student.device)
        trunk_hidden, targets = self._targets(idx, ids, mask)
        # With a shared trunk the student runs only its layers after it, from the teacher's state
        # at the branch point (the student's own, as its trunk holds the teacher's weights).
        states = self.model(ids, mask, trunk_hidden)
        return self.objective(student, states, targets, mask, ids, counts)

    def _targets(self, idx: list[int], ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor | None, Targets]:
        """(the trunk's output or None, the teacher's targets) of samples ``idx`` on the student's device."""
        device = self.student.device
        if self.activations is not None:
            trunk, targets = self.activations.batch(idx)
        elif self.topk is not None:
            topk, rows = self.topk, torch.tensor(idx)
            trunk = None
            targets = Targets(
                topk=TopKTeacher(topk.values[rows], topk.indices[rows], topk.rest_logsumexp[rows], topk.temperature)
            )
        else:
            teacher = self.teacher
            trunk, targets = teacher_targets(teacher, ids.to(teacher.device), mask.to(teacher.device), self.plan)
        return _on(trunk, device), Targets(
            teacher=targets.teacher,
            final=_on(targets.final, device),
            span=_on(targets.span, device),
            topk=None
            if targets.topk is None
            else TopKTeacher(
                *(t.to(device) for t in (targets.topk.values, targets.topk.indices, targets.topk.rest_logsumexp)),
                targets.topk.temperature,
            ),
        )

    def _plan(self) -> TargetPlan:
        """What each batch reads: the activation cache's plan (checked against the student), or
        the live teacher's signals with the shared trunk found on the weights."""
        needs = self.objective.needs
        if self.activations is not None:
            plan = self.activations.plan
            if plan.needs != needs:
                raise DistillError(
                    f"the activation cache holds {sorted(plan.needs)}, the objective needs {sorted(needs)}"
                )
            frozen = not self.student.get_input_embeddings().weight.requires_grad and not any(
                p.requires_grad
                for layer in list(decoder_layers(self.student))[: plan.trunk]
                for p in layer.parameters()
            )
            if plan.trunk and (not frozen or trunk_digest(self.student, plan.trunk) != self.activations.trunk_digest):
                raise DistillError(
                    f"the activation cache's first {plan.trunk} layers are not this student's frozen layers; "
                    "set distill.activation_cache=false or compute the cache for this student"
                )
            return plan
        if self.topk is not None:
            return TargetPlan(needs=frozenset({"topk"}))
        trunk = self._shared_trunk() if self.share_trunk else 0
        span = self.span
        if span is None and "span" in needs:
            span = span_depths(self.student, self.teacher, self.cfg)
        return plan_targets(self.cfg, needs, trunk, span)

    def _shared_trunk(self) -> int:
        """How many leading layers the student runs from the teacher's hidden state instead of its own.

        Those layers must hold the teacher's weights (checked, not assumed) and stay frozen; 0
        otherwise. When both models compute in float32 the student's result is its own full
        forward's to the bit; a bfloat16 teacher hands over the state its bfloat16 matmuls
        computed (the student's own float32 trunk would differ by that rounding).
        """
        teacher, student = self.teacher, self.student
        if teacher is None or teacher.device != student.device or student.get_input_embeddings().weight.requires_grad:
            return 0
        frozen = 0
        for layer in decoder_layers(student):
            if any(p.requires_grad for p in layer.parameters()):
                break
            frozen += 1
        return min(frozen, shared_prefix(student, teacher))

    def _score_heldout(self, step: int) -> None:
        """One point of the healing curve; its time is kept out of the training time."""
        curve = self.progress.heldout_curve
        if self.heldout and self.rank == 0 and not any(s == step for s, _ in curve):
            began = time.perf_counter()
            ppl = heldout_perplexity(self.student, self.heldout)["perplexity"]
            curve.append([step, ppl])
            self._started += time.perf_counter() - began
            if self.on_heldout is not None:
                self.on_heldout(step, ppl)


class _FinalHidden(torch.nn.Module):
    """The student's decoder as one module whose forward returns its ``StudentStates``.

    The losses apply the (tied) output head themselves, chunk by chunk, so the module that
    ``DistributedDataParallel`` wraps is the part of the model its forward runs; the head's
    weight still belongs to it, and its gradient is reduced like every other.
    """

    def __init__(self, student, autocast: bool, trunk: int = 0, span_layer: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.autocast = autocast
        # Its layers from ``trunk`` on, run from the teacher's state at that depth (shared trunk).
        self.tail = tail_model(student, trunk) if trunk else None
        # The layer whose output is the student's state at the end of the removed block (span).
        self.span_layer = span_layer

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, trunk_hidden: torch.Tensor | None = None
    ) -> StudentStates:
        captured = {}
        hook = None
        if self.span_layer is not None:
            hook = self.span_layer.register_forward_hook(
                lambda m, args, out: captured.__setitem__("span", out[0] if isinstance(out, tuple) else out)
            )
        try:
            if trunk_hidden is None:
                final = final_hidden(self.student, input_ids, attention_mask, autocast=self.autocast)
            else:
                with bfloat16_autocast(self.autocast, input_ids.device):
                    final = tail_hidden(self.tail, trunk_hidden, attention_mask).float()
        finally:
            if hook is not None:
                hook.remove()
        span = captured.get("span")
        return StudentStates(final, None if span is None else span.float())


def _on(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def select_trainable(student, cfg: DistillConfig) -> list[torch.nn.Parameter]:
    """Freeze what the recipe keeps fixed (the tied embedding, the early layers); the rest trains."""
    layers = student.get_decoder().layers
    if cfg.train_last_layers > len(layers):
        raise DistillError(
            f"distill.train_last_layers={cfg.train_last_layers} exceeds the student's "
            f"{len(layers)} decoder layers; allowed: 0 (all) to {len(layers)}"
        )
    student.requires_grad_(True)
    if cfg.freeze_embeddings:
        student.get_input_embeddings().requires_grad_(False)
        student.get_output_embeddings().requires_grad_(False)
    if cfg.train_last_layers:
        for layer in layers[: len(layers) - cfg.train_last_layers]:
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


def _batch_counts(samples: dict[str, torch.Tensor], idx: list[int], objective: Objective, world: int) -> LossCounts:
    """The micro-batch's loss counts; in a process group, the whole global batch's."""
    if idx:
        local = objective.counts(samples["attention_mask"][idx], samples["input_ids"][idx])
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
        checksum = torch.stack(
            [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
        ).sum(0)
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


def _adamw(params: list[torch.nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    # The fused kernel updates in place; the default multi-tensor path allocates
    # parameter-sized temporaries (another ~1 GB for gemma-3-270m).
    kwargs = {"lr": cfg.learning_rate, "weight_decay": cfg.weight_decay}
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, **kwargs)


def distill_checkpoint(
    teacher_ref: CheckpointRef,
    student_ref: CheckpointRef,
    cfg: DistillConfig,
    train: TokensRef,
    out_dir: Path,
    *,
    heldout: TokensRef | None = None,
    topk_cache: Path | None = None,
    activations: ActivationsRef | None = None,
    device: str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
    on_heldout: Callable[[int, float], None] | None = None,
    unkeyed_ok: bool = False,
    probe_dir: Path | None = None,
) -> tuple[CheckpointRef, TrainingRecord]:
    """Distil the student checkpoint from the teacher checkpoint (or its top-k cache, or its
    activation cache) on the ``train`` tokens and save the result; with ``heldout`` tokens it
    records the healing curve. Training from ``activations`` gives the same weights to the bit as
    from the live teacher, so it is not part of the result's key.
    ``auto`` precisions resolve by the machine's probe kept in ``probe_dir`` (``bfloat16_is_faster``).

    A finished checkpoint already in ``out_dir`` is handed back only when it records this
    run's settings and inputs and its files are as written (``finished_distillation``;
    ``unkeyed_ok`` as there); one whose files were edited since is distilled again and replaced.
    In a process group every rank trains; rank 0 writes the checkpoint and the others wait for it.
    """
    check_distill_out(out_dir, teacher_ref, student_ref)
    key = inputs_key(cfg, teacher_ref, student_ref, train, heldout, topk_cache, _process_group()[1])
    if (done := finished_distillation(out_dir, key, unkeyed_ok=unkeyed_ok)) is not None:
        return done, training_record(done)
    if existing_checkpoint(out_dir) is None:  # one of ours that was edited is replaced by write_checkpoint
        check_checkpoint_target(out_dir)
    student, tokenizer = load_model(student_ref, device=device)
    # A later phase of distill.then may take only the first num_samples of the tokenised samples.
    samples = {name: rows[: cfg.num_samples] for name, rows in train.samples().items()}
    teacher = topk = cache = span = None
    if activations is not None:
        cache = ActivationCache(activations, samples)
    elif topk_cache is not None:
        topk = load_topk_cache(topk_cache, samples, cfg)
    else:
        teacher = load_teacher(teacher_ref, cfg.teacher_dtype, samples["input_ids"], device, probe_dir)
        # Before a layer is added or a map folded in: the removed block is found on the weights.
        span = span_depths(student, teacher, cfg) if "span" in objective_needs(cfg) else None
    fitted_map = fill_removed_block(student, teacher_ref, cfg, samples, device)
    heldout_sets = heldout.per_source() if heldout is not None else None
    resume_file = resume_path(out_dir, cfg, teacher_ref, student_ref, train, topk_cache, _process_group()[1])
    teachers = dict(topk=topk, activations=cache, span=span, resume_file=resume_file, probe_dir=probe_dir)
    rank, world = _process_group()
    if rank != 0:
        Distiller(teacher, student, samples, cfg, **teachers).fit()
        _barrier(world)
        done = existing_checkpoint(out_dir)
        return done, training_record(done)

    def train_and_save(tmp: Path) -> None:
        record = Distiller(
            teacher, student, samples, cfg, heldout=heldout_sets, on_step=on_step, on_heldout=on_heldout, **teachers
        ).fit()
        record = dataclasses.replace(record, linear_map=fitted_map)
        save_model(student, tokenizer, tmp)
        write_training_record(tmp, record)
        (tmp / INPUTS_FILE).write_text(json.dumps({"key": key}) + "\n")

    try:
        ref = write_checkpoint(out_dir, train_and_save)
    finally:
        if cache is not None:
            cache.close()
    resume_file.unlink(missing_ok=True)
    _barrier(world)
    return ref, training_record(ref)


def fill_removed_block(
    student, teacher_ref: CheckpointRef, cfg: DistillConfig, samples: dict[str, torch.Tensor], device: str = "cpu"
) -> dict | None:
    """What stands in the removed block before training, as the settings ask: a new decoder layer
    (``replacement_layer``), a linear map folded into the layer before it (``linear_map``; its
    fit is returned), or nothing."""
    if not (cfg.replacement_layer or cfg.linear_map):
        return None
    original = load_model(teacher_ref, device=device)[0]
    if cfg.replacement_layer:
        replace_removed_block(student, original)
        return None
    first = {k: v[: cfg.linear_map_samples] for k, v in samples.items()}
    return fit_linear_map(student, original, first, batch_size=cfg.batch_size).to_dict()


# Beside the weights: the key of the settings and inputs the checkpoint was distilled with.
INPUTS_FILE = "distill_inputs.json"


def inputs_key(
    cfg: DistillConfig,
    teacher_ref: CheckpointRef,
    student_ref: CheckpointRef,
    train: TokensRef,
    heldout: TokensRef | None,
    topk_cache: Path | None,
    world: int,
) -> str:
    """Everything a distilled checkpoint (and its record) depends on, hashed: the settings, both
    checkpoints, the training and held-out tokens, the teacher cache and the number of processes."""
    return stable_hash(
        cfg.model_dump(),
        teacher_ref.fingerprint,
        student_ref.fingerprint,
        train.fingerprint,
        heldout.fingerprint if heldout is not None else None,
        str(topk_cache) if topk_cache is not None else None,
        world,
    )


def finished_distillation(out_dir: Path, key: str, *, unkeyed_ok: bool = False) -> CheckpointRef | None:
    """The finished checkpoint in ``out_dir`` when it was distilled with the inputs ``key`` names;
    None when there is none yet, or when it is this run's but its files were edited since it was
    written (ours, and damaged: distilled again). One of other settings or inputs is an error,
    as is one that records no inputs (written before they were recorded, or not a distillation)
    unless ``unkeyed_ok``: the flow's folder names are themselves keyed by the inputs. Reads
    every file of this run's checkpoint (about 2 s per GB)."""
    if existing_checkpoint(out_dir) is None:
        return None
    stored = Path(out_dir) / INPUTS_FILE
    if not stored.is_file():
        if not unkeyed_ok:
            raise DistillError(
                f"{out_dir} holds a checkpoint that records no distillation inputs ({INPUTS_FILE}), so "
                "it cannot be told to be this run's; it is left untouched: choose another --out"
            )
    elif (recorded := str(json.loads(stored.read_text()).get("key"))) != key:
        raise DistillError(
            f"{out_dir} holds a distillation of other settings or inputs (key {recorded[:12]}, this "
            f"run's {key[:12]}); it is left untouched: choose another --out or move it away"
        )
    # This run's (or may be): handed back only as it was written.
    return intact_checkpoint(out_dir)


def check_distill_out(out_dir: Path, teacher_ref: CheckpointRef, student_ref: CheckpointRef) -> None:
    """Before any work: the distilled checkpoint goes to a folder of its own, neither the teacher
    or the student checkpoint (whose FINGERPRINT would pass for a finished distillation) nor
    inside or around one (writing there would change a checkpoint the run reads)."""
    out = Path(out_dir).resolve()
    for role, ref in (("teacher", teacher_ref), ("student", student_ref)):
        folder = Path(ref.path).resolve()
        where = (
            "is"
            if out == folder
            else "is inside"
            if folder in out.parents
            else "holds"
            if out in folder.parents
            else None
        )
        if where is not None:
            raise DistillError(
                f"--out {out_dir} {where} the --{role} checkpoint {ref.path}; the distilled model "
                "needs a folder of its own: choose another --out"
            )


def resume_path(
    out_dir: Path,
    cfg: DistillConfig,
    teacher_ref: CheckpointRef,
    student_ref: CheckpointRef,
    train: TokensRef,
    topk_cache: Path | None,
    world: int,
) -> Path:
    """Where a distillation keeps its resumable state: keyed by everything the training depends
    on (settings, both checkpoints, the training tokens, the teacher cache, the number of
    processes), so a different run never resumes from it."""
    key = stable_hash(
        cfg.model_dump(), teacher_ref.fingerprint, student_ref.fingerprint, train.fingerprint, str(topk_cache), world
    )
    return out_dir.with_name(f"{out_dir.name}.resume-{key}.pt")


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
