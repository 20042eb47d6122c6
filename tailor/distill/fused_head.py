"""The student's output head and the distillation loss in one pass over token chunks.

For a bias-free linear head (Gemma, Llama) and a divergence with a closed-form logit gradient
(``Divergence.fused``), each chunk's gradient with respect to the student's logits is pushed through
the head at once into the hidden-state and weight gradients (``FusedHeadKD``): no logits are kept or
recomputed, and no [B, T, V] tensor exists (Gemma's 262,144-entry vocabulary makes a [8, 128, V]
float32 tensor 1 GiB). The teacher is read a chunk at a time too: ``LiveTeacher`` applies its head to
its final hidden states, ``tailor.distill.kd_loss.TopKTeacher`` reads a top-k cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tailor.distill.divergences import ChunkTeacher, Divergence
from tailor.distill.kd_loss import IGNORE


class LiveTeacher:
    """The teacher's logits, computed per chunk from its final hidden states."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> None:
        self.hidden, self.weight, self.temperature = hidden, weight, temperature

    def log_probs(self, start: int, stop: int, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p of the rows into ``out``; ``scratch`` is overwritten."""
        hidden = (self.hidden[start:stop] / self.temperature).to(self.weight.dtype)
        logits_into(hidden, self.weight, scratch)  # a bfloat16 teacher's logits become float32 here
        return torch.log_softmax(scratch, -1, out=out)

    def forward_kl(
        self, start: int, stop: int, log_q: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(p || q) per row, q - p in ``log_q``'s memory)."""
        p, log_p = scratch
        self.log_probs(start, stop, scratch=p, out=log_p)
        torch.exp(log_p, out=p)
        # In place and summed by torch's cascade: a bmm dot product drifts ~1e-5 here.
        per_token = log_p.sub_(log_q).mul_(p).sum(-1)
        return per_token, torch.exp(log_q, out=log_q).sub_(p)


class FusedHeadKD(torch.autograd.Function):
    """The loss and its gradient in one pass over token chunks, for a bias-free linear head.

    Backward only scales the gradients forward computed: the head runs once forward and twice for
    gradients, as in the full computation. ``apply(student_hidden, weight, teacher, targets,
    divergence, temperature, div_scale, ce_scale, chunk_tokens, matmul_dtype)``: [N, D] hidden states
    of the positions in the loss, the head's [V, D] weight, a ``ChunkTeacher`` over the same N rows,
    their [N] next-token targets, the weights of the divergence and cross-entropy sums.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        weight: torch.Tensor,
        teacher: ChunkTeacher,
        targets: torch.Tensor,
        divergence: Divergence,
        temperature: float,
        div_scale: float,
        ce_scale: float,
        chunk_tokens: int,
        matmul_dtype: torch.dtype,
    ) -> torch.Tensor:
        grad_hidden = torch.empty(student_hidden.shape, dtype=torch.float32, device=student_hidden.device)
        # Not zeroed: the head's first product writes it, touching its pages as late as it can.
        # A frozen head (distill.freeze_embeddings) needs none: one head product less per token.
        grad_weight = (
            torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        )
        head = _HeadMatmuls(weight, matmul_dtype, student_hidden.shape[0], chunk_tokens, grad_weight)
        total = FusedHeadKD._chunks(
            student_hidden,
            head,
            teacher,
            targets,
            divergence,
            temperature,
            div_scale,
            ce_scale,
            chunk_tokens,
            grad_hidden,
        )
        # After the chunk buffers are gone: in bfloat16, up to GRAD_GROUP tokens, they never
        # coexist with the written weight gradient.
        head.close()
        ctx.save_for_backward(
            grad_hidden.to(student_hidden.dtype), None if grad_weight is None else grad_weight.to(weight.dtype)
        )
        return total

    @staticmethod
    def _chunks(
        student_hidden: torch.Tensor,
        head: _HeadMatmuls,
        teacher: ChunkTeacher,
        targets: torch.Tensor,
        divergence: Divergence,
        temperature: float,
        div_scale: float,
        ce_scale: float,
        chunk_tokens: int,
        grad_hidden: torch.Tensor,
    ) -> torch.Tensor:
        """The loss summed over chunks; each chunk's gradients handed to ``head``."""
        T = temperature
        positions = student_hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        rows = min(chunk_tokens, positions)
        # Three [chunk, V] buffers reused by every chunk: allocating vocabulary-sized
        # temporaries per operation costs more (page faults, zeroing) than the maths.
        buffers = [
            torch.empty((rows, head.vocab_size), dtype=torch.float32, device=student_hidden.device) for _ in range(3)
        ]
        for start in range(0, positions, chunk_tokens):
            stop = min(start + chunk_tokens, positions)
            scaled_logits, log_q, spare = (buffer[: stop - start] for buffer in buffers)
            hidden = student_hidden[start:stop].float()
            head.logits(hidden / T, out=scaled_logits)
            ce_grad = _cross_entropy_terms(scaled_logits * T, targets[start:stop]) if ce_scale else None
            torch.log_softmax(scaled_logits, -1, out=log_q)
            # From here on the scaled logits are spent: the divergence may overwrite them.
            per_token, grad = divergence.fused_chunk(teacher, start, stop, log_q, (scaled_logits, spare))
            total = total + div_scale * per_token.sum()
            scale = div_scale / T
            if ce_grad is not None:
                ce_sum, ce = ce_grad
                total = total + ce_scale * ce_sum
                grad = grad.mul_(scale).add_(ce, alpha=ce_scale)
                scale = 1.0
            head.gradients(grad, hidden, scale, grad_hidden[start:stop])
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # In place: a weight-sized copy would be the step's memory peak. A second backward
        # through the same graph fails autograd's version check instead of reusing them.
        return (
            grad_hidden.mul_(grad_output),
            None if grad_weight is None else grad_weight.mul_(grad_output),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


class _HeadMatmuls:
    """The head's three products over a micro-batch's chunks, in float32 or with bfloat16 operands.

    The weight gradient ``grad_weight`` arrives unwritten; the first product writes it.
    float32: both gradients per chunk (``addmm_`` accumulates the weight gradient in place).
    bfloat16: the hidden-state gradient per chunk; the chunks' logit gradients are kept
    (bfloat16, up to ``GRAD_GROUP`` tokens, or one chunk if that is larger) and the weight
    gradient is taken once per group, in vocabulary blocks accumulated in float32: with
    128-token chunks the block products and float32 additions ran at about twice the time
    per token of one 512-token group (a scratch measurement of gemma-3-270m's head on this
    2-core CPU).
    """

    GRAD_BLOCK = 8192
    GRAD_GROUP = 1024

    def __init__(
        self, weight: torch.Tensor, dtype: torch.dtype, tokens: int, chunk_tokens: int, grad_weight: torch.Tensor | None
    ) -> None:
        self.dtype, self.grad_weight, self.written = dtype, grad_weight, False
        self.vocab_size = weight.shape[0]
        self.weight = weight.to(dtype)
        self.low = dtype != torch.float32
        if self.low and grad_weight is not None:
            rows = min(tokens, max(self.GRAD_GROUP, chunk_tokens))  # a group holds at least one chunk
            self.pending_grad = torch.empty((rows, weight.shape[0]), dtype=dtype, device=weight.device)
            self.pending_hidden = torch.empty((rows, weight.shape[1]), dtype=dtype, device=weight.device)
            self.pending = 0

    def logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return logits_into(hidden.to(self.dtype), self.weight, out)

    def gradients(self, grad: torch.Tensor, hidden: torch.Tensor, scale: float, grad_hidden: torch.Tensor) -> None:
        """``grad_hidden = scale * grad @ W``; ``scale * grad.T @ hidden`` is added to the weight gradient."""
        if self.grad_weight is None:  # frozen head
            grad_hidden.copy_(grad.to(self.dtype) @ self.weight).mul_(scale)
            return
        if not self.low:
            torch.matmul(grad, self.weight, out=grad_hidden).mul_(scale)
            # beta=0 ignores the unwritten contents (NaN included).
            self.grad_weight.addmm_(grad.T, hidden, beta=1 if self.written else 0, alpha=scale)
            self.written = True
            return
        rows = grad.shape[0]
        if self.pending + rows > self.pending_grad.shape[0]:
            self.finish()
        pending_grad = self.pending_grad[self.pending : self.pending + rows]
        torch.mul(grad, scale, out=pending_grad)
        self.pending_hidden[self.pending : self.pending + rows].copy_(hidden)
        self.pending += rows
        grad_hidden.copy_(pending_grad @ self.weight)

    def close(self) -> None:
        """Drop the weight's bfloat16 copy (the pending products do not use it); complete the weight gradient."""
        self.weight = None
        self.finish()

    def finish(self) -> None:
        """Write out the pending chunks' weight gradient."""
        if self.grad_weight is None:
            return
        if self.low and self.pending:
            grad, hidden = self.pending_grad[: self.pending], self.pending_hidden[: self.pending]
            for start in range(0, grad.shape[1], self.GRAD_BLOCK):
                stop = start + self.GRAD_BLOCK
                block = grad[:, start:stop].T @ hidden
                if self.written:
                    self.grad_weight[start:stop].add_(block)
                else:
                    self.grad_weight[start:stop].copy_(block)
            self.pending = 0
        elif not self.written:
            self.grad_weight.zero_()  # no tokens at all
        self.written = True


# Vocabulary rows per block of ``logits_into``: the block's [rows, chunk] result stays in cache.
_LOGIT_BLOCK = 1024


def logits_into(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[c, V] = hidden @ weight.T`` (``out`` may be of a wider dtype than ``weight``).

    A float32 product on CPU is taken in vocabulary blocks, ``weight[block] @ hidden.T``,
    whose transpose is copied into ``out`` while it is in cache: on a 2-core AVX-512 CPU MKL
    ran that orientation near its matmul peak and the direct [c, 262144] product at ~70% of
    it (gemma-3-270m's head, 128-256 tokens per chunk). A bfloat16 product is taken directly
    and widened in one contiguous copy, which beat the blocked form there (148 vs 163 ms
    per 128-token chunk, scratch measurement).
    """
    if out.device.type != "cpu" or weight.dtype != torch.float32:
        return out.copy_(hidden @ weight.T) if out.dtype != weight.dtype else torch.matmul(hidden, weight.T, out=out)
    rows = weight.shape[0]
    block = torch.empty((min(_LOGIT_BLOCK, rows), hidden.shape[0]), dtype=weight.dtype, device=weight.device)
    for start in range(0, rows, _LOGIT_BLOCK):
        stop = min(start + _LOGIT_BLOCK, rows)
        part = block[: stop - start]
        torch.matmul(weight[start:stop], hidden.T, out=part)
        out[:, start:stop].copy_(part.T)
    return out


def _cross_entropy_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, its gradient w.r.t. the logits) over valid targets."""
    valid = targets != IGNORE
    rows = valid.nonzero().squeeze(1)
    log_probs = F.log_softmax(logits, dim=-1)
    ce_sum = -log_probs[rows, targets[rows]].sum()
    grad = log_probs.exp_()  # in place: no second [chunk, V] tensor
    grad[rows, targets[rows]] -= 1
    grad[~valid] = 0
    return ce_sum, grad
