"""What a distillation keeps while it runs and what it leaves beside the distilled weights.

``TrainingProgress`` travels in the resume state, which is read back with
``torch.load(weights_only=True)``: its ``state_dict()`` holds plain Python values only.
``TrainingRecord`` is written as ``distill_record.json``, a plain JSON object whose keys are
the field names, so the file stays readable without this package.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from tailor.store.checkpoint import TRAINING_RECORD, CheckpointRef


@dataclass
class TrainingProgress:
    """Position of the next micro-batch and everything counted so far (this rank's)."""

    epoch: int = 0
    batch: int = 0
    """The next batch of ``epoch``."""
    losses: list[float] = field(default_factory=list)
    """Mean loss of each optimiser step."""
    grad_norms: list[float] = field(default_factory=list)
    """Gradient norm of each optimiser step, before clipping."""
    micro: int = 0
    """Micro-batches done."""
    tokens: int = 0
    """Real (non-padding) tokens this rank trained on."""
    seconds: float = 0.0
    """Training time of this session and the ones it resumed, held-out scoring left out."""
    resumed_at: int = 0
    """Optimiser steps already done when this session started."""
    heldout_curve: list[list[float]] = field(default_factory=list)
    """``[step, held-out perplexity]`` points: lists, as they come back from JSON."""

    @property
    def steps(self) -> int:
        return len(self.losses)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> TrainingProgress:
        return cls(**state)


@dataclass(frozen=True, kw_only=True)
class TrainingRecord:
    """One distillation's outcome: per-step series, throughput, and the settings as they resolved."""

    losses: list[float]
    grad_norms: list[float]
    optimizer_steps: int
    micro_batches: int
    train_tokens: int
    """Over all ranks."""
    train_seconds: float
    train_tokens_per_s: float
    num_samples: int
    resumed_at_step: int
    world_size: int
    final_learning_rate: float
    teacher: str
    """``live (<numerics>)`` or ``cached top-<k>``."""
    gradient_checkpointing: bool
    bf16_autocast: bool
    trainable_parameters: int
    # Records written before the shared trunk existed lack it: none was shared.
    shared_trunk_layers: int = 0
    heldout_curve: list[list[float]]
    loss: dict
    """The objective's settings (``Objective.describe()``)."""
    linear_map: dict | None = None
    """The map fitted in the removed block's place before training (``LinearMapFit.to_dict()``), if any."""
    # Records written before the probe existed lack it; so do runs whose precisions were all explicit.
    precision_probe: dict | None = None
    """What ``auto`` precision was decided by on this machine (``PrecisionProbe.to_dict()``): the
    float32 and bfloat16 matmul GFLOP/s per probed shape, the choice and its rule."""

    # The per-step series; every other field is one figure or setting of the whole run.
    SERIES: ClassVar[tuple[str, ...]] = ("losses", "grad_norms", "heldout_curve")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        required = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        }
        if unknown := sorted(data.keys() - names):
            raise ValueError(f"not a training record: unknown keys {unknown}")
        if missing := sorted(required - data.keys()):
            raise ValueError(f"not a training record: missing keys {missing}")
        return cls(**data)

    def summary(self) -> dict:
        """Every field but the per-step series (what is logged as the run's metrics)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.SERIES}


def training_record(ref: CheckpointRef) -> TrainingRecord:
    """The training record a distilled checkpoint folder keeps beside its weights."""
    path = Path(ref.path) / TRAINING_RECORD
    try:
        return TrainingRecord.from_dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def write_training_record(folder: Path, record: TrainingRecord) -> None:
    (Path(folder) / TRAINING_RECORD).write_text(json.dumps(record.to_dict()))
