"""What the student is trained to match: the teacher's next-token distribution, its hidden states, or a mix.

An objective is built once from the settings (``build_objective``) and called per micro-batch
with the student's states (``StudentStates``: its final hidden state, the output head's input,
and where asked its state at the end of the removed span) and the teacher's ``Targets`` for the
same positions. Each objective says which teacher signals it ``needs``, so the trainer (or the
activation cache, ``tailor.distill.activation_cache``) computes only those. A new objective is
a subclass registered in ``OBJECTIVES`` and named by ``DistillConfig.objective``.

``logits``: the divergence between temperature-softened distributions (``tailor.distill.losses``),
through the output head a chunk of tokens at a time.

``hidden``: a distance between the student's and the teacher's final hidden states. Gemma's
final norm and tied head turn that state into logits, so matching it matches the logits
without paying for the 640 x 262,144 head (about 1.7x the cost of the whole 18-layer body of
gemma-3-270m) for either model, nor for a 262k-way softmax. ``hidden_loss``:
``mse`` the squared error relative to the teacher's squared norm, per token;
``cosine`` one minus the cosine similarity, per token (scale-free: the direction is what the
head reads, up to the softmax temperature its norm sets).

``span``: the same distance at the end of the removed block: the student's state entering the
first layer it kept after the cut against the teacher's state entering that same layer (the
input that layer was trained on; LLM-Streamline's target). After a cut of the last layers it is
the residual stream before the final norm.

``topk_logits``: forward KL over k + 1 outcomes, the teacher's top-k tokens and "any other",
with the student's logits computed at those k ids only (k x 640 multiply-adds a token instead of
262,144 x 640). The student's mass on "any other" is not computed: it is taken to be the
teacher's (the cached log-sum-exp of the rest), so the loss is zero exactly when the student's
k logits equal the teacher's, and its gradient moves only those k logits.

A weighted mix of ``hidden``, ``span`` and ``topk_logits`` (``objective: {hidden: 1, span: 0.5}``)
is their weighted sum, each normalised as alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tailor.config.settings import DistillConfig
from tailor.distill.kd_loss import LossCounts, LossSpec, TopKTeacher
from tailor.distill.losses import LiveTeacherKDLoss, TopKTeacherKDLoss, _plain_head

HIDDEN_LOSSES = ("mse", "cosine")
# Teacher signals an objective may need: the live teacher model, its final normed hidden state,
# its state at the end of the removed span, its top-k logits.
SIGNALS = ("teacher", "final", "span", "topk")


@dataclass
class Targets:
    """What the teacher gives one micro-batch: each field is set when an objective needs it."""

    teacher: object | None = None
    """The live teacher model (logit KD through its head)."""
    final: torch.Tensor | None = None
    """[B, T, D] final normed hidden states (float32)."""
    span: torch.Tensor | None = None
    """[B, T, D] states entering the first layer kept after the removed block (float32)."""
    topk: TopKTeacher | None = None
    """Top-k logits per position, shaped [B, T, k] ([B, T] for the rest's log-sum-exp)."""


@dataclass
class StudentStates:
    final: torch.Tensor
    """[B, T, D] the student's final normed hidden states, the output head's input."""
    span: torch.Tensor | None = None
    """[B, T, D] its state entering the first layer it kept after the cut (``span`` objective)."""


class Objective:
    """A training loss between the student's states and the teacher's targets."""

    name = ""
    uses_output_head = False
    """Whether the loss runs the student's output head (which, tied, also gives the embedding a dense gradient)."""
    needs: frozenset[str] = frozenset()
    """The ``SIGNALS`` the teacher must provide."""

    def counts(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> LossCounts:
        """What the loss averages over in this batch (summed over ranks by data-parallel training)."""
        return LossCounts.of(attention_mask, input_ids, LossSpec())

    def __call__(
        self,
        student,
        states: StudentStates,
        targets: Targets,
        attention_mask: torch.Tensor,
        input_ids: torch.Tensor,
        counts: LossCounts,
    ) -> torch.Tensor:
        """The loss of one micro-batch, normalised by ``counts`` (the global batch's)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The objective's settings, for the training record and the report."""
        return {"objective": self.name}


class LogitKD(Objective):
    """Divergence between the teacher's and the student's softened next-token distributions."""

    name = "logits"
    uses_output_head = True
    needs = frozenset({"teacher", "final"})

    def __init__(self, spec: LossSpec, chunk_tokens: int, matmul_dtype: torch.dtype) -> None:
        self.spec = spec
        self.live = LiveTeacherKDLoss(spec, chunk_tokens, matmul_dtype)
        # A top-k cache has no other divergence's form; the settings refuse a cache with one.
        self.cached = TopKTeacherKDLoss(spec, chunk_tokens, matmul_dtype) if spec.kind == "forward_kl" else None

    def counts(self, attention_mask, input_ids):
        return self.live.counts(attention_mask, input_ids)

    def __call__(self, student, states, targets, attention_mask, input_ids, counts):
        if targets.topk is not None:
            if self.cached is None:
                raise ValueError(f"a cached top-k teacher supports loss forward_kl only, not {self.spec.kind!r}")
            return self.cached(student, states.final, targets.topk, attention_mask, input_ids, counts)
        return self.live(student, states.final, targets.teacher, targets.final, attention_mask, input_ids, counts)

    def describe(self):
        spec = self.spec
        return {
            "objective": self.name,
            "kind": spec.kind,
            "temperature": spec.temperature,
            "alpha": spec.alpha,
            "book": spec.book,
        }


class HiddenStateDistance(Objective):
    """Per-token distance between final hidden states, averaged over real (non-padding) tokens."""

    name = "hidden"
    needs = frozenset({"final"})
    state = "final"

    def __init__(self, loss: str) -> None:
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"unknown hidden-state loss {loss!r}; allowed: {', '.join(HIDDEN_LOSSES)}")
        self.loss = loss

    def __call__(self, student, states, targets, attention_mask, input_ids, counts):
        keep = attention_mask.bool()
        s, t = getattr(states, self.state), getattr(targets, self.state)
        return hidden_distance(s[keep], t[keep], self.loss).sum() / counts.tokens

    def describe(self):
        return {"objective": self.name, "hidden_loss": self.loss}


class SpanEndDistance(HiddenStateDistance):
    """Per-token distance between the states entering the first layer kept after the removed block."""

    name = "span"
    needs = frozenset({"span"})
    state = "span"


class SparseTopKKD(Objective):
    """Forward KL over the teacher's top-k tokens and "the rest", the student's logits at those k ids only.

    Per real position, with z the teacher's top-k logits / T, r the log-sum-exp of its other
    logits / T and s the student's logits / T at the same ids, the teacher's distribution over
    k + 1 outcomes is softmax([z, r]) and the student's softmax([s, r]): the student's "rest" is
    the teacher's. Scaled by T^2 and averaged over real tokens, as the full logit KD.
    """

    name = "topk_logits"
    uses_output_head = True
    needs = frozenset({"topk"})

    def __init__(self, temperature: float, chunk_tokens: int) -> None:
        self.temperature, self.chunk_tokens = temperature, chunk_tokens

    def __call__(self, student, states, targets, attention_mask, input_ids, counts):
        if not _plain_head(student):
            raise ValueError("topk_logits needs a bias-free linear output head without soft-capping")
        keep = attention_mask.bool()
        hidden, topk = states.final[keep], targets.topk.select(keep)
        weight = student.get_output_embeddings().weight
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            stop = start + self.chunk_tokens
            rows = weight[topk.indices[start:stop].long()]  # [n, k, D]
            student_logits = torch.einsum("nd,nkd->nk", hidden[start:stop].float(), rows.float())
            total = (
                total
                + sparse_topk_kl(
                    student_logits,
                    topk.values[start:stop].float(),
                    topk.rest_logsumexp[start:stop].float(),
                    self.temperature,
                ).sum()
            )
        return self.temperature**2 * total / counts.tokens

    def describe(self):
        return {"objective": self.name, "temperature": self.temperature}


def sparse_topk_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, rest_logsumexp: torch.Tensor, temperature: float
) -> torch.Tensor:
    """[N, k] raw logits at the teacher's top-k ids and [N] rest log-sum-exp (at T) -> [N] KL(p || q)
    over the k + 1 outcomes, the "rest" outcome's logit the teacher's for both."""
    rest = rest_logsumexp[:, None]
    log_p = torch.log_softmax(torch.cat([teacher_logits / temperature, rest], dim=1), dim=1)
    log_q = torch.log_softmax(torch.cat([student_logits / temperature, rest], dim=1), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


class Weighted(Objective):
    """A weighted sum of objectives, each normalised as it would be alone."""

    name = "weighted"

    def __init__(self, parts: list[tuple[float, Objective]]) -> None:
        self.parts = parts
        self.uses_output_head = any(o.uses_output_head for _, o in parts)
        self.needs = frozenset().union(*(o.needs for _, o in parts))

    def __call__(self, student, states, targets, attention_mask, input_ids, counts):
        return sum(w * o(student, states, targets, attention_mask, input_ids, counts) for w, o in self.parts)

    def describe(self):
        return {"objective": self.name, "parts": [{"weight": w, **o.describe()} for w, o in self.parts]}


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, loss: str) -> torch.Tensor:
    """[N, D] student and teacher states -> [N] per-token distances (float32)."""
    s, t = student.float(), teacher.float()
    if loss == "mse":
        return (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)
    if loss == "cosine":
        return 1 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)
    raise ValueError(f"unknown hidden-state loss {loss!r}; allowed: {', '.join(HIDDEN_LOSSES)}")


OBJECTIVES = {
    "logits": lambda cfg, matmuls: LogitKD(
        LossSpec(
            temperature=cfg.temperature, kind=cfg.loss, alpha=cfg.alpha, jsd_beta=cfg.jsd_beta, book=cfg.book_loss
        ),
        cfg.loss_chunk_tokens,
        matmuls,
    ),
    "hidden": lambda cfg, matmuls: HiddenStateDistance(cfg.hidden_loss),
    "span": lambda cfg, matmuls: SpanEndDistance(cfg.hidden_loss),
    "topk_logits": lambda cfg, matmuls: SparseTopKKD(cfg.temperature, cfg.loss_chunk_tokens),
}


def build_objective(cfg: DistillConfig, matmul_dtype: torch.dtype = torch.float32) -> Objective:
    """The objective ``cfg.objective`` names (or the weighted mix it maps); ``matmul_dtype`` is the
    student's head matmuls' (logits only)."""
    weights = cfg.objective_weights()
    unknown = sorted(set(weights) - set(OBJECTIVES))
    if unknown:
        raise ValueError(f"unknown distill.objective {', '.join(unknown)}; allowed: {', '.join(OBJECTIVES)}")
    parts = [(w, OBJECTIVES[name](cfg, matmul_dtype)) for name, w in weights.items()]
    if len(parts) == 1 and parts[0][0] == 1.0:
        return parts[0][1]
    return Weighted(parts)


def objective_needs(cfg: DistillConfig) -> frozenset[str]:
    """The teacher signals ``cfg``'s objective reads (without building its losses)."""
    return build_objective(cfg).needs
