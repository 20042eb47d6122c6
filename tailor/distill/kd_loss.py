"""What the distillation loss is: its settings, what it averages over, the cached teacher it may read,
and the full-tensor reference every fast path (``tailor.distill.losses``) is tested against.

The loss is ``(1 - alpha) * T^2 * divergence + alpha * next-token cross-entropy``, averaged over real
(non-padding) tokens, the divergence (``tailor.distill.divergences``) taken between the
temperature-softened teacher p and student q. ``book=True`` reproduces the book's notebook exactly:
``kl_div(..., reduction="batchmean")`` over the padded [B, T, V] tensor (sum over every position,
padding included, divided by B), no T^2, no cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailor.distill.divergences import build_divergence

IGNORE = -100


@dataclass(frozen=True)
class LossSpec:
    temperature: float = 2.0
    kind: str = "forward_kl"
    """A key of ``tailor.distill.divergences.DIVERGENCES``."""
    alpha: float = 0.0
    jsd_beta: float = 0.5
    book: bool = False

    def weights(self, counts: LossCounts) -> tuple[float, float]:
        """Weights of the divergence sum and the cross-entropy sum in the loss."""
        if self.book:
            return 1 / counts.sequences, 0.0
        return (1 - self.alpha) * self.temperature**2 / counts.tokens, self.alpha / max(counts.targets, 1)


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Target of each position: the next real token, or IGNORE."""
    targets = torch.full_like(input_ids, IGNORE)
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    targets[:, :-1] = torch.where(valid, input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE))
    return targets


@dataclass(frozen=True)
class LossCounts:
    """What the loss is averaged over: positions compared, next-token targets, sequences.

    Data-parallel training passes the counts of the whole global batch, so that summing
    the ranks' gradients gives exactly the single-process gradient.
    """

    tokens: int
    targets: int
    sequences: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec) -> LossCounts:
        keep = torch.ones_like(attention_mask, dtype=torch.bool) if spec.book else attention_mask.bool()
        targets = next_token_targets(input_ids, attention_mask)
        return cls(int(keep.sum()), int((targets != IGNORE).sum()), int(input_ids.shape[0]))


def kd_loss_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    spec: LossSpec = LossSpec(),
) -> torch.Tensor:
    """Direct full-tensor computation of the loss (for tests and small models)."""
    if spec.book:
        return F.kl_div(
            F.log_softmax(student_logits / spec.temperature, dim=-1),
            F.softmax(teacher_logits / spec.temperature, dim=-1),
            reduction="batchmean",
        )
    keep = attention_mask.bool()
    div = build_divergence(spec).sum(student_logits[keep], teacher_logits[keep], spec.temperature)
    targets = next_token_targets(input_ids, attention_mask)
    ce = F.cross_entropy(student_logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    div_scale, ce_scale = spec.weights(LossCounts.of(attention_mask, input_ids, spec))
    return div_scale * div + ce_scale * ce


@dataclass
class TopKTeacher:
    """A teacher's top-k logits per position and the log-sum-exp (at temperature T) of the rest.

    ``values`` [N, k] raw logits (float16 on disk), ``indices`` [N, k], ``rest_logsumexp`` [N]
    = log sum over the other tokens of exp(logit / T). N counts positions (any leading shape
    is flattened by ``select``).
    """

    values: torch.Tensor
    indices: torch.Tensor
    rest_logsumexp: torch.Tensor
    temperature: float

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float) -> TopKTeacher:
        """Top-k of [..., V] logits; the rest's log-sum-exp from the full one minus the top-k's."""
        z = logits.float() / temperature
        values, indices = z.topk(k, dim=-1)
        full, top = torch.logsumexp(z, dim=-1), torch.logsumexp(values, dim=-1)
        # log(exp(full) - exp(top)); an empty rest gets a vanishing mass instead of -inf.
        rest = full + (-torch.expm1(top - full)).clamp_min(1e-30).log()
        return cls((values * temperature).half(), indices.int(), rest, temperature)

    def select(self, keep: torch.Tensor) -> TopKTeacher:
        """The positions ``keep`` marks, as [N, ...] rows."""
        return TopKTeacher(self.values[keep], self.indices[keep], self.rest_logsumexp[keep], self.temperature)

    def forward_kl(
        self, start: int, stop: int, log_q: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KL over the k + 1 outcomes per row, q - target in ``log_q``'s memory); ``scratch`` is unused.

        The target is p on the top-k tokens and the rest's mass spread like the student's own.
        """
        idx = self.indices[start:stop].long()
        # Teacher over k + 1 outcomes: top-k tokens, then "the rest".
        t = torch.cat(
            [self.values[start:stop].float() / self.temperature, self.rest_logsumexp[start:stop, None].float()], dim=1
        )
        log_p = t - torch.logsumexp(t, dim=1, keepdim=True)
        log_q_top = log_q.gather(1, idx)
        q_top = log_q_top.exp()
        q_rest = (1 - q_top.sum(1)).clamp_min(torch.finfo(torch.float32).tiny)
        log_q_all = torch.cat([log_q_top, q_rest.log()[:, None]], dim=1)
        p = log_p.exp()
        per_token = (p * (log_p - log_q_all)).sum(-1)
        # Off the top-k: q - q * p_rest / q_rest; on it: q - p. One pass over the vocabulary.
        grad = torch.exp(log_q, out=log_q).mul_((1 - p[:, -1] / q_rest)[:, None])
        grad.scatter_(1, idx, q_top - p[:, :-1])
        return per_token, grad
