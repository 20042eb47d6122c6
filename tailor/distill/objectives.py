"""What the student is trained to match: the teacher's next-token distribution or its final hidden state.

An objective is built once from the settings (``build_objective``) and called per micro-batch
with the student's final hidden states (the output head's input) and the teacher's target
for the same positions. A new objective is a subclass registered in ``OBJECTIVES`` and named
by ``DistillConfig.objective``; the trainer knows nothing of which one it runs.

``logits``: the divergence between temperature-softened distributions (``tailor.distill.losses``),
through the output head a chunk of tokens at a time.

``hidden``: a distance between the student's and the teacher's final hidden states. Gemma's
final norm and tied head turn that state into logits, so matching it matches the logits
without paying for the 640 x 262,144 head (about 1.7x the cost of the whole 18-layer body of
gemma-3-270m) for either model, nor for a 262k-way softmax. ``hidden_loss``:
``mse`` the squared error relative to the teacher's squared norm, per token;
``cosine`` one minus the cosine similarity, per token (scale-free: the direction is what the
head reads, up to the softmax temperature its norm sets).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tailor.config.settings import DistillConfig
from tailor.distill.kd_loss import LossCounts, LossSpec, TopKTeacher
from tailor.distill.losses import LiveTeacherKDLoss, TopKTeacherKDLoss

HIDDEN_LOSSES = ("mse", "cosine")


class Objective:
    """A training loss between the student's final hidden states and the teacher's target."""

    name = ""
    uses_output_head = False
    """Whether the loss runs the student's output head (which, tied, also gives the embedding a dense gradient)."""

    def counts(self, attention_mask: torch.Tensor, input_ids: torch.Tensor) -> LossCounts:
        """What the loss averages over in this batch (summed over ranks by data-parallel training)."""
        return LossCounts.of(attention_mask, input_ids, LossSpec())

    def __call__(
        self,
        student,
        student_hidden: torch.Tensor,
        target,
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

    def __init__(self, spec: LossSpec, chunk_tokens: int, matmul_dtype: torch.dtype) -> None:
        self.spec = spec
        self.live = LiveTeacherKDLoss(spec, chunk_tokens, matmul_dtype)
        # A top-k cache has no other divergence's form; the settings refuse a cache with one.
        self.cached = TopKTeacherKDLoss(spec, chunk_tokens, matmul_dtype) if spec.kind == "forward_kl" else None

    def counts(self, attention_mask, input_ids):
        return self.live.counts(attention_mask, input_ids)

    def __call__(self, student, student_hidden, target, attention_mask, input_ids, counts):
        if isinstance(target, TopKTeacher):
            if self.cached is None:
                raise ValueError(f"a cached top-k teacher supports loss forward_kl only, not {self.spec.kind!r}")
            return self.cached(student, student_hidden, target, attention_mask, input_ids, counts)
        teacher, teacher_hidden = target
        return self.live(student, student_hidden, teacher, teacher_hidden, attention_mask, input_ids, counts)

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

    def __init__(self, loss: str) -> None:
        if loss not in HIDDEN_LOSSES:
            raise ValueError(f"unknown hidden-state loss {loss!r}; allowed: {', '.join(HIDDEN_LOSSES)}")
        self.loss = loss

    def __call__(self, student, student_hidden, target, attention_mask, input_ids, counts):
        _, teacher_hidden = target
        keep = attention_mask.bool()
        return hidden_distance(student_hidden[keep], teacher_hidden[keep], self.loss).sum() / counts.tokens

    def describe(self):
        return {"objective": self.name, "hidden_loss": self.loss}


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
}


def build_objective(cfg: DistillConfig, matmul_dtype: torch.dtype = torch.float32) -> Objective:
    """The objective ``cfg.objective`` names; ``matmul_dtype`` is the student's head matmuls' (logits only)."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"unknown distill.objective {cfg.objective!r}; allowed: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.objective](cfg, matmul_dtype)
