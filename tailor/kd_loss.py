"""Knowledge-distillation losses, computed in token chunks.

Gemma's vocabulary has 262,144 entries: a [8, 128, V] float32 tensor is 1 GiB.
Instead of materialising full logits, we take the final hidden states of both
models and apply each output head to a chunk of tokens at a time, so at most one chunk
of logits is alive at once and the result equals the full computation. For a bias-free
linear head (Gemma, Llama) the closed-form logit gradient is pushed through the head
chunk by chunk (``_FusedHeadKD``); otherwise (JSD, soft-capped heads) the student's
chunk is recomputed in backward (activation checkpointing).

Divergences between the temperature-softened teacher p and student q, per token:
``forward_kl`` KL(p || q) (the book's choice), ``reverse_kl`` KL(q || p), ``jsd`` the
generalised Jensen-Shannon divergence with weight ``jsd_beta``. The loss is
``(1 - alpha) * T^2 * divergence + alpha * next-token cross-entropy``, averaged over
real (non-padding) tokens. ``book=True`` reproduces the book's notebook exactly:
``kl_div(..., reduction="batchmean")`` over the padded [B, T, V] tensor (sum over every
position, padding included, divided by B), no T^2, no cross-entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


@dataclass(frozen=True)
class LossSpec:
    temperature: float = 2.0
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    alpha: float = 0.0
    jsd_beta: float = 0.5
    book: bool = False


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output head (with Gemma-style final soft-capping when configured)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Sum over tokens of the chosen divergence between softened distributions (float32)."""
    T = spec.temperature
    log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    if spec.kind == "forward_kl":
        return (log_p.exp() * (log_p - log_q)).sum()
    if spec.kind == "reverse_kl":
        return (log_q.exp() * (log_q - log_p)).sum()
    beta = spec.jsd_beta
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    return beta * (log_p.exp() * (log_p - log_m)).sum() + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum()


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Target of each position: the next real token, or IGNORE."""
    targets = torch.full_like(input_ids, IGNORE)
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    targets[:, :-1] = torch.where(valid, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE))
    return targets


def _combine(div: torch.Tensor, ce: torch.Tensor, n_tokens: int, n_targets: int, batch: int,
             spec: LossSpec) -> torch.Tensor:
    if spec.book:
        return div / batch
    loss = (1 - spec.alpha) * div / n_tokens * spec.temperature**2
    if spec.alpha:
        loss = loss + spec.alpha * ce / max(n_targets, 1)
    return loss


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: torch.Tensor,
                      input_ids: torch.Tensor, spec: LossSpec = LossSpec()) -> torch.Tensor:
    """Direct full-tensor computation of the loss (for tests and small models)."""
    if spec.book:
        return F.kl_div(F.log_softmax(student_logits / spec.temperature, dim=-1),
                        F.softmax(teacher_logits / spec.temperature, dim=-1), reduction="batchmean")
    keep = attention_mask.bool()
    div = divergence_sum(student_logits[keep], teacher_logits[keep], spec)
    targets = next_token_targets(input_ids, attention_mask)
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                         reduction="sum")
    return _combine(div, ce, int(keep.sum()), int((targets != IGNORE).sum()), input_ids.shape[0], spec)


def kd_loss_chunked(student, teacher, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec = LossSpec(),
                    chunk_tokens: int = 256) -> torch.Tensor:
    """Same value and gradient as ``kd_loss_reference`` on the models' logits, in bounded memory."""
    keep = torch.ones_like(attention_mask, dtype=torch.bool) if spec.book else attention_mask.bool()
    s_h, t_h = student_hidden[keep], teacher_hidden[keep]
    targets = next_token_targets(input_ids, attention_mask)[keep]
    n_tokens = s_h.shape[0]
    if int(attention_mask.sum()) == 0:
        raise ValueError("batch has no real (non-padding) tokens")
    n_targets = int((targets != IGNORE).sum())
    if _plain_head(student) and _plain_head(teacher) and spec.kind != "jsd":
        div_scale = 1 / input_ids.shape[0] if spec.book else (1 - spec.alpha) * spec.temperature**2 / n_tokens
        ce_scale = 0.0 if spec.book else spec.alpha / max(n_targets, 1)
        return _FusedHeadKD.apply(s_h, student.get_output_embeddings().weight, t_h,
                                  teacher.get_output_embeddings().weight, targets, spec, div_scale, ce_scale,
                                  chunk_tokens)

    def chunk_terms(s_chunk: torch.Tensor, t_logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s_logits = output_logits(student, s_chunk)
        div = divergence_sum(s_logits, t_logits, spec)
        ce = (F.cross_entropy(s_logits.float(), tgt, ignore_index=IGNORE, reduction="sum")
              if spec.alpha and not spec.book else div.new_zeros(()))
        return torch.stack([div, ce])

    totals = s_h.new_zeros(2, dtype=torch.float32)
    for start in range(0, n_tokens, chunk_tokens):
        with torch.no_grad():
            t_logits = output_logits(teacher, t_h[start:start + chunk_tokens])
        s_chunk, tgt = s_h[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if s_chunk.requires_grad:
            totals = totals + checkpoint(chunk_terms, s_chunk, t_logits, tgt, use_reentrant=False)
        else:
            totals = totals + chunk_terms(s_chunk, t_logits, tgt)
    return _combine(totals[0], totals[1], n_tokens, int((targets != IGNORE).sum()), input_ids.shape[0], spec)


def _plain_head(model) -> bool:
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not getattr(model.config, "final_logit_softcapping", None))


class _FusedHeadKD(torch.autograd.Function):
    """The loss and its gradient in one pass over token chunks, for a bias-free linear head.

    Per chunk, the gradient with respect to the student's logits has a closed form
    ((q - p) / T for forward KL), so it is pushed through the head at once into the
    hidden-state and weight gradients. Backward then only scales them: no logits are
    kept or recomputed, and the head runs once forward and twice for gradients, as in
    the full computation, without any [B, T, V] tensor.
    """

    @staticmethod
    def forward(ctx, s_h, weight, t_h, t_weight, targets, spec: LossSpec, div_scale: float, ce_scale: float,
                chunk_tokens: int):
        T = spec.temperature
        grad_h = torch.empty(s_h.shape, dtype=torch.float32, device=s_h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=s_h.device)
        w32 = weight.float()
        for start in range(0, s_h.shape[0], chunk_tokens):
            stop = start + chunk_tokens
            h = s_h[start:stop].float()
            s_logits = h @ w32.T
            t_logits = (t_h[start:stop] @ t_weight.T).float()
            log_p = F.log_softmax(t_logits / T, dim=-1)
            log_q = F.log_softmax(s_logits / T, dim=-1)
            q = log_q.exp()
            if spec.kind == "forward_kl":
                p = log_p.exp()
                per_token = (p * (log_p - log_q)).sum(-1)
                grad = (q - p) / T
            else:  # reverse_kl
                log_ratio = log_q - log_p
                per_token = (q * log_ratio).sum(-1)
                grad = q * (log_ratio - per_token[:, None]) / T
            total = total + div_scale * per_token.sum()
            grad = grad * div_scale
            if ce_scale:
                tgt = targets[start:stop]
                valid = tgt != IGNORE
                log_s = F.log_softmax(s_logits, dim=-1)
                rows = valid.nonzero().squeeze(1)
                total = total - ce_scale * log_s[rows, tgt[rows]].sum()
                ce_grad = log_s.exp()
                ce_grad[rows, tgt[rows]] -= 1
                ce_grad[~valid] = 0
                grad = grad + ce_scale * ce_grad
            grad_h[start:stop] = grad @ w32
            grad_w += grad.T @ h
        ctx.save_for_backward(grad_h.to(s_h.dtype), grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_output * grad_h, grad_output * grad_w, None, None, None, None, None, None, None
