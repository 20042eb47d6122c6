"""The distillation loss as objects: built once from its settings, then called per micro-batch.

``LiveTeacherKDLoss`` reads the teacher's final hidden states, ``TopKTeacherKDLoss`` a cached top-k
teacher (``TopKTeacher``). Both apply the output heads a chunk of tokens at a time, so at most one
chunk of logits is alive at once and the result equals the full computation (``kd_loss_reference``,
value and gradient). For a bias-free linear head and a divergence with a closed-form logit gradient
that gradient is pushed through the head chunk by chunk (``tailor.distill.fused_head``); otherwise
(JSD, soft-capped heads) the student's chunk is recomputed in backward (activation checkpointing).

    loss = LiveTeacherKDLoss(LossSpec(temperature=2.0), chunk_tokens=256)
    value = loss(student, student_hidden, teacher, teacher_hidden, attention_mask, input_ids)

``counts`` (the whole global batch's, under data-parallel training) sets what the loss averages
over; by default the micro-batch's own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tailor.distill.divergences import ChunkTeacher, build_divergence
from tailor.distill.fused_head import FusedHeadKD, LiveTeacher
from tailor.distill.kd_loss import IGNORE, LossCounts, LossSpec, TopKTeacher, next_token_targets
from tailor.models.heads import output_logits


class _ChunkedKDLoss:
    """What both teachers' losses share: the settings, the positions compared and their weights."""

    def __init__(
        self, spec: LossSpec = LossSpec(), chunk_tokens: int = 256, matmul_dtype: torch.dtype = torch.float32
    ) -> None:
        """``matmul_dtype=torch.bfloat16`` runs the student's head matmuls in bfloat16 (as autocast
        would); the softmaxes, the loss and the gradients' accumulation stay float32."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be at least 1, not {chunk_tokens}")
        self.spec, self.chunk_tokens, self.matmul_dtype = spec, chunk_tokens, matmul_dtype
        self.divergence = build_divergence(spec)

    def counts(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> LossCounts:
        """What the loss averages over in this batch."""
        return LossCounts.of(attention_mask, input_ids, self.spec)

    def _positions(
        self, attention_mask: torch.Tensor, input_ids: torch.Tensor, counts: LossCounts | None
    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """(positions in the loss, their next-token targets, divergence and cross-entropy weights)."""
        if int(attention_mask.sum()) == 0:
            raise ValueError("batch has no real (non-padding) tokens")
        keep = torch.ones_like(attention_mask, dtype=torch.bool) if self.spec.book else attention_mask.bool()
        targets = next_token_targets(input_ids, attention_mask)[keep]
        return (keep, targets, *self.spec.weights(counts or self.counts(attention_mask, input_ids)))

    def _fused(
        self,
        student_rows: torch.Tensor,
        student,
        teacher: ChunkTeacher,
        targets: torch.Tensor,
        div_scale: float,
        ce_scale: float,
    ) -> torch.Tensor:
        return FusedHeadKD.apply(
            student_rows,
            student.get_output_embeddings().weight,
            teacher,
            targets,
            self.divergence,
            self.spec.temperature,
            div_scale,
            ce_scale,
            self.chunk_tokens,
            self.matmul_dtype,
        )


class LiveTeacherKDLoss(_ChunkedKDLoss):
    """The loss against a live teacher, any divergence of ``DIVERGENCES``."""

    def __call__(
        self,
        student,
        student_hidden: torch.Tensor,
        teacher,
        teacher_hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        counts: LossCounts | None = None,
    ) -> torch.Tensor:
        """The loss of [B, T, D] final hidden states (the output heads' inputs) of both models."""
        keep, targets, div_scale, ce_scale = self._positions(attention_mask, input_ids, counts)
        student_rows, teacher_rows = student_hidden[keep], teacher_hidden[keep]
        if _plain_head(student) and _plain_head(teacher) and self.divergence.fused:
            live = LiveTeacher(teacher_rows, teacher.get_output_embeddings().weight, self.spec.temperature)
            return self._fused(student_rows, student, live, targets, div_scale, ce_scale)
        return self._checkpointed(student, teacher, student_rows, teacher_rows, targets, div_scale, ce_scale)

    def _checkpointed(
        self,
        student,
        teacher,
        student_rows: torch.Tensor,
        teacher_rows: torch.Tensor,
        targets: torch.Tensor,
        div_scale: float,
        ce_scale: float,
    ) -> torch.Tensor:
        """The loss through autograd, the student's chunk of logits recomputed in backward."""
        matmul_dtype, temperature = self.matmul_dtype, self.spec.temperature

        def chunk_terms(
            student_chunk: torch.Tensor, teacher_logits: torch.Tensor, chunk_targets: torch.Tensor
        ) -> torch.Tensor:
            with torch.autocast(student_chunk.device.type, dtype=matmul_dtype, enabled=matmul_dtype != torch.float32):
                student_logits = output_logits(student, student_chunk)
            div = self.divergence.sum(student_logits, teacher_logits, temperature)
            ce = (
                F.cross_entropy(student_logits.float(), chunk_targets, ignore_index=IGNORE, reduction="sum")
                if ce_scale
                else div.new_zeros(())
            )
            return div_scale * div + ce_scale * ce

        total = student_rows.new_zeros((), dtype=torch.float32)
        for start in range(0, student_rows.shape[0], self.chunk_tokens):
            stop = start + self.chunk_tokens
            with torch.no_grad():
                teacher_logits = output_logits(teacher, teacher_rows[start:stop])
            student_chunk, chunk_targets = student_rows[start:stop], targets[start:stop]
            if student_chunk.requires_grad:
                total = total + checkpoint(
                    chunk_terms, student_chunk, teacher_logits, chunk_targets, use_reentrant=False
                )
            else:
                total = total + chunk_terms(student_chunk, teacher_logits, chunk_targets)
        return total


class TopKTeacherKDLoss(_ChunkedKDLoss):
    """Forward KL from a cached top-k teacher (k logits + the log-sum-exp of the rest).

    The teacher distribution has k + 1 outcomes: its top-k tokens and "any other token"; the
    student's probability of the latter is its mass outside the top-k. Equal to the exact loss when
    the rest carries no mass; normalised as ``LiveTeacherKDLoss``.
    """

    def __init__(
        self, spec: LossSpec = LossSpec(), chunk_tokens: int = 256, matmul_dtype: torch.dtype = torch.float32
    ) -> None:
        if spec.kind != "forward_kl":
            raise ValueError(f"a cached top-k teacher supports loss forward_kl only, not {spec.kind!r}")
        super().__init__(spec, chunk_tokens, matmul_dtype)

    def __call__(
        self,
        student,
        student_hidden: torch.Tensor,
        topk: TopKTeacher,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        counts: LossCounts | None = None,
    ) -> torch.Tensor:
        """The loss of the student's [B, T, D] final hidden states against ``topk`` on the same positions."""
        if not _plain_head(student):
            raise ValueError("a cached top-k teacher needs a bias-free linear output head without soft-capping")
        keep, targets, div_scale, ce_scale = self._positions(attention_mask, input_ids, counts)
        return self._fused(student_hidden[keep], student, topk.select(keep), targets, div_scale, ce_scale)


def _plain_head(model) -> bool:
    """Whether the fused head applies: a bias-free linear head, its logits not soft-capped."""
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and not getattr(model.config, "final_logit_softcapping", None)
    )
