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

``kd_loss_topk`` takes the teacher from a cache instead (``TopKTeacher``: its top-k
logits and the log-sum-exp of the rest per position) and computes the forward KL over
those k + 1 outcomes, through the same fused head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tailor.models.heads import output_logits

IGNORE = -100


@dataclass(frozen=True)
class LossSpec:
    temperature: float = 2.0
    kind: str = "forward_kl"
    """A key of ``DIVERGENCES``."""
    alpha: float = 0.0
    jsd_beta: float = 0.5
    book: bool = False


class Divergence:
    """A divergence between the temperature-softened teacher p and student q, per token.

    A new divergence is a subclass registered in ``DIVERGENCES`` (and named in
    ``DistillConfig.loss``) with ``per_token``, the reference every path is tested against
    (autograd differentiates it, chunk by chunk, where no closed form is given). With a
    closed-form gradient it also implements ``fused_chunk``, which ``_FusedHeadKD`` pushes
    through the output head without keeping logits.
    """

    fused = False
    """Whether ``fused_chunk`` is implemented."""

    def per_token(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """[N, V] log-probabilities -> [N] divergences."""
        raise NotImplementedError

    def fused_chunk(self, teacher, start: int, stop: int, log_q: torch.Tensor, a: torch.Tensor,
                    c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token divergence, its gradient with respect to the student's logits / T) for the
        chunk's rows ``start:stop``; ``log_q``, ``a`` and ``c`` are [rows, V] float32 buffers that
        may be overwritten (``log_q`` holds log q on entry, ``a`` the student's logits / T)."""
        raise NotImplementedError


class ForwardKL(Divergence):
    """KL(p || q): mass-covering; the book's choice. Its logit gradient is q - p."""

    fused = True

    def per_token(self, log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    def fused_chunk(self, teacher, start, stop, log_q, a, c):
        return teacher.forward_kl(start, stop, log_q, (a, c))  # grad: q - p, in log_q's memory


class ReverseKL(Divergence):
    """KL(q || p): mode-seeking. Live teacher only (a top-k cache has no full log p)."""

    fused = True

    def per_token(self, log_p, log_q):
        return (log_q.exp() * (log_q - log_p)).sum(-1)

    def fused_chunk(self, teacher, start, stop, log_q, a, c):
        # d/ds KL(q||p) = q * (log q - log p - KL(q||p)), per row
        log_p = teacher.log_probs(start, stop, scratch=a, out=c)
        log_ratio = torch.sub(log_q, log_p, out=c)
        q = torch.exp(log_q, out=a)
        per_token = torch.mul(q, log_ratio, out=log_q).sum(-1)  # log q is spent
        return per_token, log_ratio.sub_(per_token[:, None]).mul_(q)  # in c


class JSD(Divergence):
    """Generalised Jensen-Shannon divergence, teacher weight ``beta`` in the mixture m."""

    def __init__(self, beta: float):
        self.beta = beta

    def per_token(self, log_p, log_q):
        beta = self.beta
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


DIVERGENCES = {"forward_kl": lambda spec: ForwardKL(), "reverse_kl": lambda spec: ReverseKL(),
               "jsd": lambda spec: JSD(spec.jsd_beta)}


def divergence(spec: "LossSpec") -> Divergence:
    """The divergence ``spec.kind`` names."""
    if spec.kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {spec.kind!r}; allowed: {', '.join(DIVERGENCES)}")
    return DIVERGENCES[spec.kind](spec)


def divergence_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Sum over tokens of the chosen divergence between softened distributions (float32)."""
    T = spec.temperature
    log_p = F.log_softmax(teacher_logits.float() / T, dim=-1)
    log_q = F.log_softmax(student_logits.float() / T, dim=-1)
    return divergence(spec).per_token(log_p, log_q).sum()


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
    def of(cls, attention_mask: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec) -> "LossCounts":
        keep = torch.ones_like(attention_mask, dtype=torch.bool) if spec.book else attention_mask.bool()
        targets = next_token_targets(input_ids, attention_mask)
        return cls(int(keep.sum()), int((targets != IGNORE).sum()), int(input_ids.shape[0]))


def _scales(counts: LossCounts, spec: LossSpec) -> tuple[float, float]:
    """Weights of the divergence sum and the cross-entropy sum in the loss."""
    if spec.book:
        return 1 / counts.sequences, 0.0
    return (1 - spec.alpha) * spec.temperature**2 / counts.tokens, spec.alpha / max(counts.targets, 1)


def _positions_and_scales(attention_mask: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec,
                          counts: LossCounts | None) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(positions in the loss, their next-token targets, divergence and cross-entropy weights)."""
    if int(attention_mask.sum()) == 0:
        raise ValueError("batch has no real (non-padding) tokens")
    keep = torch.ones_like(attention_mask, dtype=torch.bool) if spec.book else attention_mask.bool()
    targets = next_token_targets(input_ids, attention_mask)[keep]
    return (keep, targets, *_scales(counts or LossCounts.of(attention_mask, input_ids, spec), spec))


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
    div_scale, ce_scale = _scales(LossCounts.of(attention_mask, input_ids, spec), spec)
    return div_scale * div + ce_scale * ce


def kd_loss_chunked(student, teacher, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor, input_ids: torch.Tensor, spec: LossSpec = LossSpec(),
                    chunk_tokens: int = 256, counts: LossCounts | None = None,
                    matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same value and gradient as ``kd_loss_reference`` on the models' logits, in bounded memory.

    ``matmul_dtype=torch.bfloat16`` runs the student's head matmuls in bfloat16 (as autocast
    would); the softmaxes, the loss and the gradients' accumulation stay float32.
    """
    keep, targets, div_scale, ce_scale = _positions_and_scales(attention_mask, input_ids, spec, counts)
    s_h, t_h = student_hidden[keep], teacher_hidden[keep]
    if _plain_head(student) and _plain_head(teacher) and divergence(spec).fused:
        return _FusedHeadKD.apply(s_h, student.get_output_embeddings().weight,
                                  _LiveTeacher(t_h, teacher.get_output_embeddings().weight, spec.temperature),
                                  targets, spec, div_scale, ce_scale, chunk_tokens, matmul_dtype)

    def chunk_terms(s_chunk: torch.Tensor, t_logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        with torch.autocast(s_chunk.device.type, dtype=matmul_dtype, enabled=matmul_dtype != torch.float32):
            s_logits = output_logits(student, s_chunk)
        div = divergence_sum(s_logits, t_logits, spec)
        ce = (F.cross_entropy(s_logits.float(), tgt, ignore_index=IGNORE, reduction="sum")
              if ce_scale else div.new_zeros(()))
        return div_scale * div + ce_scale * ce

    total = s_h.new_zeros((), dtype=torch.float32)
    for start in range(0, s_h.shape[0], chunk_tokens):
        with torch.no_grad():
            t_logits = output_logits(teacher, t_h[start:start + chunk_tokens])
        s_chunk, tgt = s_h[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        if s_chunk.requires_grad:
            total = total + checkpoint(chunk_terms, s_chunk, t_logits, tgt, use_reentrant=False)
        else:
            total = total + chunk_terms(s_chunk, t_logits, tgt)
    return total


def _plain_head(model) -> bool:
    head = model.get_output_embeddings()
    return (isinstance(head, torch.nn.Linear) and head.bias is None
            and not getattr(model.config, "final_logit_softcapping", None))


def kd_loss_topk(student, student_hidden: torch.Tensor, topk: "TopKTeacher", attention_mask: torch.Tensor,
                 input_ids: torch.Tensor, spec: LossSpec = LossSpec(), chunk_tokens: int = 256,
                 counts: LossCounts | None = None, matmul_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Forward KL from a cached top-k teacher (k logits + the log-sum-exp of the rest).

    The teacher distribution has k + 1 outcomes: its top-k tokens and "any other token";
    the student's probability of the latter is its mass outside the top-k. Equal to the
    exact loss when the rest carries no mass; normalised as ``kd_loss_chunked``.
    """
    if spec.kind != "forward_kl":
        raise ValueError(f"a cached top-k teacher supports loss forward_kl only, not {spec.kind!r}")
    if not _plain_head(student):
        raise ValueError("a cached top-k teacher needs a bias-free linear output head without soft-capping")
    keep, targets, div_scale, ce_scale = _positions_and_scales(attention_mask, input_ids, spec, counts)
    return _FusedHeadKD.apply(student_hidden[keep], student.get_output_embeddings().weight, topk.select(keep),
                              targets, spec, div_scale, ce_scale, chunk_tokens, matmul_dtype)


class _LiveTeacher:
    """The teacher's logits, computed per chunk from its final hidden states."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, temperature: float):
        self.hidden, self.weight, self.T = hidden, weight, temperature

    def log_probs(self, start: int, stop: int, scratch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """log p of the chunk into ``out`` (``scratch`` is overwritten)."""
        h = (self.hidden[start:stop] / self.T).to(self.weight.dtype)
        logits_into(h, self.weight, scratch)  # a bfloat16 teacher's logits become float32 here
        return torch._log_softmax(scratch, -1, False, out=out)

    def forward_kl(self, start: int, stop: int, log_q: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor]):
        """(KL(p || q) per token, q - p in ``log_q``'s memory); ``work`` is scratch."""
        p, log_p = work
        self.log_probs(start, stop, scratch=p, out=log_p)
        torch.exp(log_p, out=p)
        # In place and summed by torch's cascade: a bmm dot product drifts ~1e-5 here.
        per_token = log_p.sub_(log_q).mul_(p).sum(-1)
        return per_token, torch.exp(log_q, out=log_q).sub_(p)


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
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float) -> "TopKTeacher":
        """Top-k of [..., V] logits; the rest's log-sum-exp from the full one minus the top-k's."""
        z = logits.float() / temperature
        values, indices = z.topk(k, dim=-1)
        full, top = torch.logsumexp(z, dim=-1), torch.logsumexp(values, dim=-1)
        # log(exp(full) - exp(top)); an empty rest gets a vanishing mass instead of -inf.
        rest = full + (-torch.expm1(top - full)).clamp_min(1e-30).log()
        return cls((values * temperature).half(), indices.int(), rest, temperature)

    def select(self, keep: torch.Tensor) -> "TopKTeacher":
        return TopKTeacher(self.values[keep], self.indices[keep], self.rest_logsumexp[keep], self.temperature)

    def forward_kl(self, start: int, stop: int, log_q: torch.Tensor, work: tuple[torch.Tensor, torch.Tensor]):
        """(KL over the k + 1 outcomes per token, q - target in ``log_q``'s memory); ``work`` is unused.

        The target is p on the top-k tokens and the rest's mass spread like the student's own.
        """
        idx = self.indices[start:stop].long()
        # Teacher over k + 1 outcomes: top-k tokens, then "the rest".
        t = torch.cat([self.values[start:stop].float() / self.temperature,
                       self.rest_logsumexp[start:stop, None].float()], dim=1)
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


class _FusedHeadKD(torch.autograd.Function):
    """The loss and its gradient in one pass over token chunks, for a bias-free linear head.

    Per chunk, the gradient with respect to the student's logits has a closed form
    ((q - p) / T for forward KL), so it is pushed through the head at once into the
    hidden-state and weight gradients. Backward then only scales them: no logits are
    kept or recomputed, and the head runs once forward and twice for gradients, as in
    the full computation, without any [B, T, V] tensor.
    """

    @staticmethod
    def forward(ctx, s_h, weight, teacher, targets, spec: LossSpec, div_scale: float, ce_scale: float,
                chunk_tokens: int, matmul_dtype: torch.dtype):
        grad_h = torch.empty(s_h.shape, dtype=torch.float32, device=s_h.device)
        # Not zeroed: the head's first product writes it, touching its pages as late as it can.
        # A frozen head (distill.freeze_embeddings) needs none: one head product less per token.
        grad_w = (torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
                  if weight.requires_grad else None)
        head = _HeadMatmuls(weight, matmul_dtype, s_h.shape[0], chunk_tokens, grad_w)
        total = _FusedHeadKD._chunks(s_h, head, teacher, targets, spec, div_scale, ce_scale, chunk_tokens, grad_h)
        # After the chunk buffers are gone: in bfloat16, up to GRAD_GROUP tokens, they never
        # coexist with the written weight gradient.
        head.close()
        ctx.save_for_backward(grad_h.to(s_h.dtype), None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def _chunks(s_h, head: "_HeadMatmuls", teacher, targets, spec: LossSpec, div_scale: float, ce_scale: float,
                chunk_tokens: int, grad_h: torch.Tensor) -> torch.Tensor:
        """The loss summed over chunks; each chunk's gradients handed to ``head``."""
        T, div = spec.temperature, divergence(spec)
        total = torch.zeros((), dtype=torch.float32, device=s_h.device)
        rows = min(chunk_tokens, s_h.shape[0])
        # Three [chunk, V] buffers reused by every chunk: allocating vocabulary-sized
        # temporaries per operation costs more (page faults, zeroing) than the maths.
        buf = [torch.empty((rows, head.weight.shape[0]), dtype=torch.float32, device=s_h.device) for _ in range(3)]
        for start in range(0, s_h.shape[0], chunk_tokens):
            stop = min(start + chunk_tokens, s_h.shape[0])
            a, b, c = (x[:stop - start] for x in buf)
            h = s_h[start:stop].float()
            head.logits(h / T, out=a)  # student logits / T
            ce_grad = _cross_entropy_terms(a * T, targets[start:stop]) if ce_scale else None
            log_q = torch._log_softmax(a, -1, False, out=b)
            per_token, grad = div.fused_chunk(teacher, start, stop, log_q, a, c)
            total = total + div_scale * per_token.sum()
            scale = div_scale / T
            if ce_grad is not None:
                ce_sum, ce = ce_grad
                total = total + ce_scale * ce_sum
                grad = grad.mul_(scale).add_(ce, alpha=ce_scale)
                scale = 1.0
            head.gradients(grad, h, scale, grad_h[start:stop])
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        # In place: a weight-sized copy would be the step's memory peak. A second backward
        # through the same graph fails autograd's version check instead of reusing them.
        return (grad_h.mul_(grad_output), None if grad_w is None else grad_w.mul_(grad_output),
                None, None, None, None, None, None, None)


class _HeadMatmuls:
    """The head's three products over a micro-batch's chunks, in float32 or with bfloat16 operands.

    The weight gradient ``grad_w`` arrives unwritten; the first product writes it.
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

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, tokens: int, chunk_tokens: int,
                 grad_w: torch.Tensor):
        self.dtype, self.grad_w, self.written = dtype, grad_w, False
        self.weight = weight.to(dtype)
        self.low = dtype != torch.float32
        if self.low and grad_w is not None:
            rows = min(tokens, max(self.GRAD_GROUP, chunk_tokens))  # a group holds at least one chunk
            self.pending_g = torch.empty((rows, weight.shape[0]), dtype=dtype, device=weight.device)
            self.pending_h = torch.empty((rows, weight.shape[1]), dtype=dtype, device=weight.device)
            self.pending = 0

    def logits(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return logits_into(hidden.to(self.dtype), self.weight, out)

    def gradients(self, grad: torch.Tensor, hidden: torch.Tensor, scale: float, grad_h: torch.Tensor) -> None:
        """``grad_h = scale * grad @ W``; ``scale * grad.T @ hidden`` is added to the weight gradient."""
        if self.grad_w is None:  # frozen head
            grad_h.copy_(grad.to(self.dtype) @ self.weight).mul_(scale)
            return
        if not self.low:
            torch.matmul(grad, self.weight, out=grad_h).mul_(scale)
            # beta=0 ignores the unwritten contents (NaN included).
            self.grad_w.addmm_(grad.T, hidden, beta=1 if self.written else 0, alpha=scale)
            self.written = True
            return
        rows = grad.shape[0]
        if self.pending + rows > self.pending_g.shape[0]:
            self.finish()
        g = self.pending_g[self.pending:self.pending + rows]
        torch.mul(grad, scale, out=g)
        self.pending_h[self.pending:self.pending + rows].copy_(hidden)
        self.pending += rows
        grad_h.copy_(g @ self.weight)

    def close(self) -> None:
        """Drop the weight's bfloat16 copy (the pending products do not use it); complete the weight gradient."""
        self.weight = None
        self.finish()

    def finish(self) -> None:
        """Write out the pending chunks' weight gradient."""
        if self.grad_w is None:
            return
        if self.low and self.pending:
            g, h = self.pending_g[:self.pending], self.pending_h[:self.pending]
            for start in range(0, g.shape[1], self.GRAD_BLOCK):
                stop = start + self.GRAD_BLOCK
                block = g[:, start:stop].T @ h
                if self.written:
                    self.grad_w[start:stop].add_(block)
                else:
                    self.grad_w[start:stop].copy_(block)
            self.pending = 0
        elif not self.written:
            self.grad_w.zero_()  # no tokens at all
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
        part = block[:stop - start]
        torch.matmul(weight[start:stop], hidden.T, out=part)
        out[:, start:stop].copy_(part.T)
    return out


def _cross_entropy_terms(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy, its gradient w.r.t. the logits) over valid targets."""
    valid = targets != IGNORE
    rows = valid.nonzero().squeeze(1)
    log_s = F.log_softmax(logits, dim=-1)
    ce_sum = -log_s[rows, targets[rows]].sum()
    grad = log_s.exp_()
    grad[rows, targets[rows]] -= 1
    grad[~valid] = 0
    return ce_sum, grad
