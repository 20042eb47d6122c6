"""Tasks that produce checkpoints and what they are built from: materialise the base model,
tokenise the corpus, score and prune layers, cache the teacher, distil."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from transformers import AutoConfig

from tailor.common.console import Progress
from tailor.common.layout import WorkDir
from tailor.common.resources import stage_cost, stage_start
from tailor.config.settings import TEACHER_SOURCE, DataConfig, DistillConfig, ModelConfig, PruneConfig, TailorConfig
from tailor.data.corpus import source_share
from tailor.data.tokenised import TokensRef, tokenise_corpus
from tailor.distill.activation_cache import ActivationsRef, write_activation_cache
from tailor.distill.data_parallel import distill_data_parallel
from tailor.distill.generated import teacher_text_for
from tailor.distill.teacher_cache import write_topk_cache
from tailor.distill.trainer import distill_checkpoint, planned_steps
from tailor.models.precision import resolve_bf16_autocast, teacher_numerics
from tailor.models.sources import materialize
from tailor.prune.importance import SCORED_STRATEGIES, choose_layers, layer_scores, per_layer_series
from tailor.prune.pruning import prune_checkpoint
from tailor.report.plots import layer_scores_png
from tailor.store.checkpoint import CheckpointRef, code_identity, load_model, stable_hash, write_file_atomically

from ._common import CACHED
from .records import (
    Activations,
    Distilled,
    LayerScores,
    Materialized,
    Pruned,
    TeacherCache,
    TeacherText,
    Tokenised,
)


@task(name="materialize-model", cache_policy=CACHED, persist_result=True, retries=2, retry_delay_seconds=[10, 30])
def materialize_model(model: ModelConfig, work_dir: str, source: str | None) -> Materialized:
    """The base checkpoint. ``source`` is ``source_fingerprint(model)``, the content of a local
    model folder (None for other sources): an input, so the cache key changes with the folder's
    files. Retried: a hub download can fail transiently."""
    start = stage_start()
    ref = materialize(model, work_dir, source)
    return Materialized(ref, stage_cost(start))


@task(name="generate-teacher-text", cache_policy=CACHED, persist_result=True)
def generate_teacher_text(teacher: CheckpointRef, cfg: TailorConfig) -> TeacherText:
    """Sequences the teacher samples itself (the corpus mix's "teacher" source); a killed run
    continues at its first missing batch."""
    start = stage_start()
    sequences = source_share(cfg.distill, cfg.distill.num_samples)[TEACHER_SOURCE]
    line = Progress("generate-text", -(-sequences // cfg.generate.batch_size), "batches")
    tokens = teacher_text_for(cfg, teacher.verify(), on_batch=lambda done, total: line.update(done))
    return TeacherText(tokens, sequences, stage_cost(start))


@task(name="tokenise-corpus", cache_policy=CACHED, persist_result=True)
def tokenise(
    base: CheckpointRef,
    distill: DistillConfig,
    prune: PruneConfig,
    data: DataConfig,
    work_dir: str,
    corpus: str,
    teacher_text: TokensRef | None = None,
) -> Tokenised:
    """The distillation corpus tokenised once: training samples, calibration windows, held-out
    documents. ``corpus`` is ``corpus_fingerprint(distill, data)``, the corpus files' content:
    an input, so the cache key changes when a file is edited."""
    start = stage_start()
    sets = tokenise_corpus(
        base.verify(),
        distill,
        prune,
        data,
        work_dir,
        teacher_text.verify() if teacher_text is not None else None,
        corpus,
    )
    return Tokenised(sets["train"], sets["calibration"], sets["heldout"], stage_cost(start))


@task(name="score-layers", cache_policy=CACHED, persist_result=True)
def score_layers(
    base: CheckpointRef, prune: PruneConfig, strategies: tuple[str, ...], calibration: TokensRef, work_dir: str
) -> LayerScores:
    """Layer-importance scores on the calibration windows of the distillation corpus."""
    start = stage_start()
    key = stable_hash(
        base.fingerprint, prune.calibration_batch_size, strategies, calibration.fingerprint, code_identity()
    )
    out = WorkDir(work_dir).importance / f"{key}.json"
    # The task's cache key also holds settings the scores do not depend on (num_layers,
    # strategy); the file is keyed by what they do depend on, so it is reused across those.
    if out.exists():
        return LayerScores(json.loads(out.read_text()), str(out), stage_cost(start))
    model = load_model(base.verify())[0]
    scores = layer_scores(model, calibration.samples(), prune.calibration_batch_size, strategies)
    write_file_atomically(out, lambda tmp: tmp.write_text(json.dumps(scores)))
    return LayerScores(scores, str(out), stage_cost(start))


@task(name="prune-model", cache_policy=CACHED, persist_result=True)
def prune_model(base: CheckpointRef, prune: PruneConfig, work_dir: str, scores: dict | None = None) -> Pruned:
    """Remove the decoder layers the strategy chooses."""
    start = stage_start()
    removed = choose_layers(prune, AutoConfig.from_pretrained(base.path).num_hidden_layers, scores)
    ref, before, after = prune_checkpoint(base, removed, work_dir)
    name = Path(ref.path).name
    plot = None
    if scores is not None:
        series = {s: per_layer_series(scores, s, prune.num_layers) for s in SCORED_STRATEGIES if s in scores}
        plot = str(
            layer_scores_png(
                series, {prune.strategy: removed}, WorkDir(work_dir).plots / f"layer-scores-{prune.strategy}-{name}.png"
            )
        )
    return Pruned(ref, removed, before, after, prune.strategy, plot, stage_cost(start))


@task(name="cache-teacher-topk", cache_policy=CACHED, persist_result=True)
def cache_teacher_topk(teacher: CheckpointRef, distill: DistillConfig, train: TokensRef, work_dir: str) -> TeacherCache:
    """The teacher's top-k logits for every distillation sample, on disk.

    The file is named by teacher fingerprint, training tokens, k and T, so a run that only
    changes training settings (learning rate, epochs) reuses it even when this task re-runs.
    """
    start = stage_start()
    work = WorkDir(work_dir)
    path = write_topk_cache(teacher.verify(), distill, train, work.teacher_cache, work.probes)
    return TeacherCache(str(path), path.stat().st_size / 2**20, stage_cost(start))


@task(name="cache-activations", cache_policy=CACHED, persist_result=True)
def cache_activations(
    teacher: CheckpointRef, student: CheckpointRef, distill: DistillConfig, train: TokensRef, work_dir: str
) -> Activations:
    """The teacher's targets and the shared trunk's output for every distillation sample, on
    disk (``tailor.distill.activation_cache``); a killed run continues at its first missing batch."""
    start = stage_start()
    work = WorkDir(work_dir)
    line = Progress("cache-activations", distill.num_samples, "samples")
    ref = write_activation_cache(
        teacher.verify(),
        student.verify(),
        distill,
        train,
        work.activations,
        work.probes,
        on_batch=lambda done, total: line.update(done),
    )
    mib = sum(f.stat().st_size for f in Path(ref.path).iterdir()) / 2**20
    return Activations(ref, mib, stage_cost(start))


def distilled_folder(
    teacher: CheckpointRef,
    student: CheckpointRef,
    distill: DistillConfig,
    train: TokensRef,
    heldout: TokensRef,
    work_dir: str,
    topk_cache: str | None = None,
) -> Path:
    """Where ``distill_model`` writes: named by both checkpoints, the settings, the token files,
    the teacher cache, the code's versions (the KD loss, the libraries) and what "auto"
    precisions resolve to on this machine (its probe in the work folder): the result depends
    on what they became."""
    probes = WorkDir(work_dir).probes
    key = stable_hash(
        code_identity(),
        teacher.fingerprint,
        student.fingerprint,
        distill.model_dump(),
        train.fingerprint,
        heldout.fingerprint,
        topk_cache,
        teacher_numerics(distill.teacher_dtype, "cpu", probes),
        resolve_bf16_autocast(distill.bf16_autocast, "cpu", probes),
    )
    return WorkDir(work_dir).checkpoints / f"distilled-{key}"


@task(name="distill-model", cache_policy=CACHED, persist_result=True)
def distill_model(
    teacher: CheckpointRef,
    student: CheckpointRef,
    distill: DistillConfig,
    data: DataConfig,
    train: TokensRef,
    heldout: TokensRef,
    work_dir: str,
    topk_cache: str | None = None,
    activations: ActivationsRef | None = None,
) -> Distilled:
    """Distil the student from the teacher (or its top-k cache, or its activation cache) on the
    ``train`` tokens; the ``heldout`` tokens give the healing curve. The result carries the typed
    ``TrainingRecord``. The activation cache does not name the result's folder: training from it
    is the same to the bit as from the live teacher."""
    # The source is part of the cache key: its last sentence keeps results cached while the
    # record was a plain dict from being read back.
    probes = WorkDir(work_dir).probes
    out = distilled_folder(teacher, student, distill, train, heldout, work_dir, topk_cache)
    progress = create_progress_artifact(
        progress=0.0, key="distillation-progress", description="Distillation: share of optimiser steps done"
    )
    total = planned_steps(distill, distill.num_samples)
    line = Progress("distill", total, "steps")

    def on_step(step: int, loss: float) -> None:
        if step % distill.log_every == 0:
            get_run_logger().info(f"distill step {step}/{total}: loss {loss:.4f}")
        update_progress_artifact(progress, progress=min(100.0, 100.0 * step / total))
        line.update(step, f"loss {loss:.4f}")

    def on_heldout(step: int, perplexity: float) -> None:
        get_run_logger().info(f"distill step {step}/{total}: held-out perplexity {perplexity:.2f}")

    start = stage_start()
    if distill.nproc_per_node > 1:
        # The processes' memory is their own: this stage's peak RSS covers the launcher only.
        get_run_logger().info(f"distill: {distill.nproc_per_node} data-parallel processes under torchrun")
        ref, record = distill_data_parallel(
            teacher.verify(),
            student.verify(),
            distill,
            data,
            train,
            out,
            Path(topk_cache) if topk_cache else None,
            unkeyed_ok=True,
            probe_dir=probes,
        )
    else:
        # unkeyed_ok: ``out`` is named by the inputs' key, so a checkpoint there written before
        # checkpoints recorded their inputs is this run's all the same.
        ref, record = distill_checkpoint(
            teacher.verify(),
            student.verify(),
            distill,
            train,
            out,
            heldout=heldout,
            topk_cache=Path(topk_cache) if topk_cache else None,
            activations=activations.verify(contents=False) if activations else None,
            on_step=on_step,
            on_heldout=on_heldout,
            unkeyed_ok=True,
            probe_dir=probes,
        )
    return Distilled(ref, record, stage_cost(start))
