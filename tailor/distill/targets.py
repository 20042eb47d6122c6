"""What the teacher hands the student for one batch, and where in both models it comes from.

A ``TargetPlan`` says which signals the objective reads (``Objective.needs``) and at which
depths: the shared trunk (the leading layers the student holds with the teacher's weights and
does not train, run once for both), the end of the removed span (``span`` objective) and the
top-k logits. ``teacher_targets`` computes one batch of them from the live teacher; the
activation cache (``tailor.distill.activation_cache``) stores the same tensors for every sample,
computed by this same function, so training from either is the same to the bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from tailor.config.settings import DistillConfig, TailorError
from tailor.distill.kd_loss import TopKTeacher
from tailor.distill.objectives import Targets
from tailor.models.heads import output_logits
from tailor.models.precision import bfloat16_autocast, has_bfloat16_matmuls
from tailor.prune.pruning import removed_block
from tailor.prune.trunk import decoder_layers, hidden_states_at, shared_prefix


class TargetError(TailorError, ValueError):
    """The objective's targets cannot be taken from these two models."""


@dataclass(frozen=True)
class TargetPlan:
    """Which teacher signals a run reads, and at which depths (depth d: the state entering layer d)."""

    needs: frozenset[str]
    trunk: int = 0
    """Leading layers the student runs from the teacher's state at this depth (0: its whole forward)."""
    span_student: int = 0
    """``span``: the student's depth at the end of the removed block (0 when not needed)."""
    span_teacher: int = 0
    """``span``: the teacher's depth at the end of the removed block, the first kept layer's input."""
    topk: int = 0
    temperature: float = 1.0

    def to_dict(self) -> dict:
        return {
            "needs": sorted(self.needs),
            "trunk": self.trunk,
            "span_student": self.span_student,
            "span_teacher": self.span_teacher,
            "topk": self.topk,
            "temperature": self.temperature,
        }

    @classmethod
    def from_dict(cls, data: dict) -> TargetPlan:
        return cls(**{**data, "needs": frozenset(data["needs"])})


def trainable_trunk(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> int:
    """The leading decoder layers of the student, as ``cfg`` will train it, that hold the teacher's
    weights and stay frozen: their output is the teacher's own state at that depth.

    ``student`` is the pruned model before any layer is added or map folded in; those change
    the layers at the cut, so the trunk ends before it.
    """
    if not (cfg.freeze_embeddings and cfg.train_last_layers):
        return 0  # a trained embedding changes every layer's input
    layers = len(decoder_layers(student)) + (1 if cfg.replacement_layer else 0)
    frozen = max(0, layers - cfg.train_last_layers)
    shared = shared_prefix(student, teacher)
    if cfg.replacement_layer or cfg.linear_map:
        setting = "distill.linear_map" if cfg.linear_map else "distill.replacement_layer"
        first = removed_block(student, teacher, setting, after_first=cfg.linear_map)[0]
        shared = min(shared, first - 1 if cfg.linear_map else first)
    return min(frozen, shared)


def span_depths(student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> tuple[int, int]:
    """(student depth, teacher depth) at the end of the removed block: the state the first layer
    kept after the cut expects. ``student`` as in ``trainable_trunk``."""
    removed = removed_block(student, teacher, "distill.objective span")
    student_depth = removed[0] + (1 if cfg.replacement_layer else 0)
    if student_depth == 0:
        raise TargetError("distill.objective span needs a kept layer before the removed block; layer 0 was removed")
    return student_depth, removed[-1] + 1


def plan_targets(
    cfg: DistillConfig, needs: frozenset[str], trunk: int, span: tuple[int, int] | None = None
) -> TargetPlan:
    """The plan for an objective reading ``needs``, with ``trunk`` shared layers and (``span``
    objective) the removed block's end at ``span`` = (student depth, teacher depth)."""
    span_student, span_teacher = span if "span" in needs and span else (0, 0)
    if "span" in needs and not span:
        raise TargetError("distill.objective span needs the removed block's depths (span_depths)")
    if span_student and span_student <= trunk:
        raise TargetError(
            f"distill.objective span compares the student's state after its layer {span_student - 1}, which "
            f"distill.train_last_layers={cfg.train_last_layers} leaves frozen; train at least the layers from "
            f"{span_student - 1} on"
        )
    return TargetPlan(
        needs=needs,
        trunk=trunk,
        span_student=span_student,
        span_teacher=span_teacher,
        topk=cfg.teacher_topk if "topk" in needs else 0,
        temperature=cfg.temperature,
    )


@torch.no_grad()
def teacher_targets(
    teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: TargetPlan
) -> tuple[torch.Tensor | None, Targets]:
    """(the state entering the student's first trained layer, or None without a trunk; the targets
    ``plan.needs``) for one batch, float32 on the teacher's device."""
    depths = tuple(sorted({d for d in (plan.trunk, plan.span_teacher) if d}))
    with bfloat16_autocast(has_bfloat16_matmuls(teacher), teacher.device):
        states, final = hidden_states_at(teacher, input_ids, attention_mask, depths)
    final = final.float()
    targets = Targets(
        teacher=teacher if "teacher" in plan.needs else None,
        final=final if plan.needs & {"final", "teacher"} else None,
        span=states[plan.span_teacher].float() if plan.span_teacher else None,
        topk=topk_rows(teacher, final, plan.topk, plan.temperature) if plan.topk else None,
    )
    return (states[plan.trunk].float() if plan.trunk else None), targets


def topk_rows(teacher: nn.Module, final: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
    """The teacher's top-k logits of [B, T, D] final states, one sequence at a time through the
    head ([T, V] logits, never [B, T, V])."""
    parts = []
    for row in final:
        with bfloat16_autocast(has_bfloat16_matmuls(teacher), row.device):
            parts.append(TopKTeacher.from_logits(output_logits(teacher, row), k, temperature))
    return TopKTeacher(
        torch.stack([p.values for p in parts]),
        torch.stack([p.indices for p in parts]),
        torch.stack([p.rest_logsumexp for p in parts]),
        temperature,
    )


def trunk_digest(model: nn.Module, trunk: int) -> str:
    """sha256 of the input embedding and the first ``trunk`` decoder layers' weights: a student
    trained from cached trunk states must hold these very weights."""
    h = hashlib.sha256()
    modules = [model.get_input_embeddings(), *list(decoder_layers(model))[:trunk]]
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
