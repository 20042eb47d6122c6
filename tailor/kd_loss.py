"""Knowledge-distillation loss computed in token chunks.

Gemma's vocabulary has 262,144 entries: a [8, 128, V] float32 tensor is 1 GiB.
Instead of materialising full logits, we take the final hidden states of both
models, keep only real (non-padding) positions and apply each output head to a
chunk of tokens at a time. The student's chunk is recomputed in backward
(activation checkpointing), so at most one chunk of logits is alive at once and
the result equals the full computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output head (with Gemma-style final soft-capping when configured)."""
    logits = model.lm_head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over tokens of KL(softmax(t/T) || softmax(s/T)), computed in float32."""
    t_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Direct full-tensor computation: T^2 * mean over real tokens of forward KL."""
    keep = attention_mask.bool()
    kl = _kl_sum(student_logits[keep], teacher_logits[keep], temperature)
    return kl / keep.sum() * temperature**2


def kd_loss_chunked(student, teacher, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor, temperature: float, chunk_tokens: int = 256) -> torch.Tensor:
    """Same value and gradient as ``kd_loss_reference`` on the models' logits, in bounded memory."""
    keep = attention_mask.bool()
    s_h = student_hidden[keep]
    t_h = teacher_hidden[keep]
    n_tokens = s_h.shape[0]
    if n_tokens == 0:
        raise ValueError("batch has no real (non-padding) tokens")

    def chunk_kl(s_chunk: torch.Tensor, t_logits: torch.Tensor) -> torch.Tensor:
        return _kl_sum(output_logits(student, s_chunk), t_logits, temperature)

    total = s_h.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk_tokens):
        with torch.no_grad():
            t_logits = output_logits(teacher, t_h[start:start + chunk_tokens])
        s_chunk = s_h[start:start + chunk_tokens]
        if s_chunk.requires_grad:
            total = total + checkpoint(chunk_kl, s_chunk, t_logits, use_reentrant=False)
        else:
            total = total + chunk_kl(s_chunk, t_logits)
    return total / n_tokens * temperature**2
