"""What each task returns: small typed records the flows read by attribute.

Every record is a reference (a ``CheckpointRef`` or a file in the work folder) plus the
figures a flow logs; never a model. Each carries its stage's ``StageCost`` as measured when
the stage ran (a cached result keeps the figures of the run that computed it).
"""

from __future__ import annotations

from dataclasses import dataclass

from tailor.common.resources import StageCost
from tailor.data.tokenised import TokensRef
from tailor.distill.activation_cache import ActivationsRef
from tailor.distill.record import TrainingRecord
from tailor.store.checkpoint import CheckpointRef


@dataclass(frozen=True)
class Materialized:
    ref: CheckpointRef
    cost: StageCost


@dataclass(frozen=True)
class Tokenised:
    """The corpus tokenised once: each consumer is handed the one set it reads."""

    train: TokensRef
    calibration: TokensRef
    heldout: TokensRef
    cost: StageCost


@dataclass(frozen=True)
class TeacherText:
    """Text the teacher sampled itself (token ids), a corpus source."""

    tokens: TokensRef
    sequences: int
    cost: StageCost


@dataclass(frozen=True)
class LayerScores:
    scores: dict
    """``layer_scores`` output: per strategy, per layer."""
    file: str
    cost: StageCost


@dataclass(frozen=True)
class Pruned:
    ref: CheckpointRef
    removed_layers: list[int]
    params_before: int
    params_after: int
    strategy: str
    plot: str | None
    """The layer-score plot with the removed layers marked (scored strategies only)."""
    cost: StageCost


@dataclass(frozen=True)
class TeacherCache:
    path: str
    mib: float
    cost: StageCost


@dataclass(frozen=True)
class Activations:
    ref: ActivationsRef
    mib: float
    cost: StageCost


@dataclass(frozen=True)
class HealedCut:
    """One cut healed by ``heal_cut``: the checkpoint, its training record and its held-out perplexity."""

    ref: CheckpointRef
    record: TrainingRecord
    heldout_ppl: float
    cost: StageCost


@dataclass(frozen=True)
class Distilled:
    ref: CheckpointRef
    record: TrainingRecord
    """``distill``'s training record: losses, healing curve, throughput, settings resolved."""
    cost: StageCost


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    """``{task: {metric: {"value", "stderr"}}}``"""
    n_samples: dict
    items_file: str
    """Per-document scores (``tailor.report.compare.load_scores`` reads them)."""
    cost: StageCost


@dataclass(frozen=True)
class Evaluations:
    """The models evaluated together on the same documents (``tailor.evaluate.joint``)."""

    models: dict[str, Evaluation]
    stopping: dict[str, dict]
    """Per task: documents used and why scoring stopped (``limit``, or the stop rule's answer)."""
    trunk_depths: dict[str, int]
    """Per model, the leading layers it shared with the first model (run once for both)."""
    scored_requests: dict[str, int]
    """Per model, requests scored in this stage; 0 for a model whose answers were stored by an earlier run."""
    cost: StageCost


@dataclass(frozen=True)
class HeldoutScore:
    perplexity: float
    sources: dict[str, float]
    """Perplexity per corpus source file."""
    tokens: int
    cost: StageCost


@dataclass(frozen=True)
class SpeedProfiles:
    profiles: dict[str, dict]
    """Per model: ``tailor.evaluate.speed.profile_checkpoints``'s figures (tokens/s, run times, sizes,
    multiply-adds per token; ``timed_as``: models of one architecture share one timing)."""
    cost: StageCost
