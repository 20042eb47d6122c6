"""Divergences between the temperature-softened teacher p and student q, per token.

``forward_kl`` KL(p || q) (the book's choice), ``reverse_kl`` KL(q || p), ``jsd`` the generalised
Jensen-Shannon divergence with teacher weight ``jsd_beta``.

A new divergence is a subclass registered in ``DIVERGENCES`` (and named in ``DistillConfig.loss``)
with ``per_token``, the reference every path is tested against (autograd differentiates it, chunk by
chunk, where no closed form is given). With a closed-form gradient it also implements ``fused_chunk``,
which the fused output head (``tailor.distill.fused_head``) pushes through the head without keeping
logits.
"""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class DivergenceSettings(Protocol):
    """The loss settings a divergence is built from (``tailor.distill.kd_loss.LossSpec`` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def jsd_beta(self) -> float: ...


class ChunkTeacher(Protocol):
    """The teacher as a fused divergence reads it: rows ``start:stop`` of its positions at a time.

    ``forward_kl`` every teacher gives; ``log_probs``, which reverse KL reads, only a live one (a top-k
    cache has no full log p).
    """

    def log_probs(self, start: int, stop: int, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p of the rows into ``out``; ``scratch`` is overwritten."""
        ...

    def forward_kl(
        self, start: int, stop: int, log_q: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL(p || q) per row, its gradient with respect to the student's logits / T)."""
        ...


class Divergence:
    """A divergence between the temperature-softened teacher p and student q, per token."""

    fused = False
    """Whether ``fused_chunk`` is implemented."""

    def per_token(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """[N, V] log-probabilities -> [N] divergences."""
        raise NotImplementedError

    def fused_chunk(
        self,
        teacher: ChunkTeacher,
        start: int,
        stop: int,
        log_q: torch.Tensor,
        scratch: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token divergence, its gradient with respect to the student's logits / T) for the rows
        ``start:stop`` of ``teacher``.

        ``log_q`` holds log q and may be overwritten; ``scratch`` is two more [rows, V] float32 buffers
        free to use. The gradient may live in any of the three.
        """
        raise NotImplementedError

    def sum(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Sum over [N, V] logits' rows of the divergence between their softened distributions (float32)."""
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
        return self.per_token(log_p, log_q).sum()


class ForwardKL(Divergence):
    """KL(p || q): mass-covering; the book's choice. Its logit gradient is q - p."""

    fused = True

    def per_token(self, log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def fused_chunk(self, teacher, start, stop, log_q, scratch):
        # The teacher knows its own form of it: a top-k cache has no full log p.
        return teacher.forward_kl(start, stop, log_q, scratch)


class ReverseKL(Divergence):
    """KL(q || p): mode-seeking. Live teacher only (a top-k cache has no full log p)."""

    fused = True

    def per_token(self, log_p, log_q):
        return (log_q.exp() * (log_q - log_p)).sum(-1)

    def fused_chunk(self, teacher, start, stop, log_q, scratch):
        # d/ds KL(q||p) = q * (log q - log p - KL(q||p)), per row
        q_buffer, ratio_buffer = scratch
        log_p = teacher.log_probs(start, stop, scratch=q_buffer, out=ratio_buffer)
        log_ratio = torch.sub(log_q, log_p, out=ratio_buffer)  # log p is spent
        q = torch.exp(log_q, out=q_buffer)
        per_token = torch.mul(q, log_ratio, out=log_q).sum(-1)  # log q is spent
        return per_token, log_ratio.sub_(per_token[:, None]).mul_(q)


class JSD(Divergence):
    """Generalised Jensen-Shannon divergence, teacher weight ``beta`` in the mixture m."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def per_token(self, log_p, log_q):
        beta = self.beta
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


DIVERGENCES: dict[str, Callable[[DivergenceSettings], Divergence]] = {
    "forward_kl": lambda spec: ForwardKL(),
    "reverse_kl": lambda spec: ReverseKL(),
    "jsd": lambda spec: JSD(spec.jsd_beta),
}


def build_divergence(spec: DivergenceSettings) -> Divergence:
    """The divergence ``spec.kind`` names."""
    if spec.kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {spec.kind!r}; allowed: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[spec.kind](spec)
