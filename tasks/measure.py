"""Tasks that measure checkpoints: lm-eval accuracy and generation speed."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tailor.common.console import Progress
from tailor.common.resources import stage_cost, stage_start
from tailor.config.settings import DataConfig, EvalConfig, SpeedConfig
from tailor.data.tokenised import TokensRef
from tailor.evaluate.joint import StopRule, evaluate_checkpoints
from tailor.evaluate.perplexity import checkpoint_heldout_perplexity
from tailor.evaluate.speed import profile_checkpoints
from tailor.store.checkpoint import CheckpointRef

from ._common import CACHED, prefect_key
from .records import Evaluation, Evaluations, HeldoutScore, SpeedProfiles


@task(name="evaluate-model", cache_policy=CACHED, persist_result=True)
def evaluate_model(
    ref: CheckpointRef, eval_cfg: EvalConfig, data: DataConfig, work_dir: str, label: str = "model", signature: str = ""
) -> Evaluation:
    """lm-eval metrics of one checkpoint (``evaluate_models`` of one model); per-item scores are
    kept in the work folder. ``signature`` (``evaluation_signature``: the data's and task files'
    content, lm-eval's version) is part of the cache key, so changed data is never served from cache.
    """
    return _evaluated({label: ref}, eval_cfg, data, work_dir, None, label).models[label]


@task(name="evaluate-models", cache_policy=CACHED, persist_result=True)
def evaluate_models(
    refs: dict[str, CheckpointRef],
    eval_cfg: EvalConfig,
    data: DataConfig,
    work_dir: str,
    rule: StopRule | None = None,
    signature: str = "",
) -> Evaluations:
    """lm-eval metrics of several checkpoints scored together on the same documents (shared
    layers run once; see ``tailor.evaluate.joint``), optionally until ``rule`` is answered.

    ``signature`` (``evaluation_signature``) is part of the cache key, so changed data is never
    served from cache.
    """
    return _evaluated(refs, eval_cfg, data, work_dir, rule)


def _evaluated(
    refs: dict[str, CheckpointRef],
    eval_cfg: EvalConfig,
    data: DataConfig,
    work_dir: str,
    rule: StopRule | None,
    label: str = "",
) -> Evaluations:
    """The evaluation with a progress artifact (keyed by ``label`` when given) and progress lines."""
    start = stage_start()
    progress = create_progress_artifact(
        progress=0.0,
        key="-".join(["evaluation-progress", *([prefect_key(label)] if label else [])]),
        description=f"Evaluation{' of ' + label if label else ''}: share of requests scored in this pass",
    )
    lines: list[Progress] = []
    last = [0]

    def on_progress(done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * done / total)
        if not lines or done <= last[0]:  # a new pass (the next look) starts its own line
            lines.append(Progress(f"evaluate-{label}" if label else "evaluate", total, "requests"))
        last[0] = done
        lines[-1].update(done)

    joint, files = evaluate_checkpoints(refs, eval_cfg, data, work_dir, rule, on_progress)
    cost = stage_cost(start)
    models = {
        name: Evaluation(r["metrics"], r["n_samples"], str(files[name]), cost) for name, r in joint.results.items()
    }
    return Evaluations(models, joint.stopping, joint.trunk_depths, joint.scored_requests, cost)


@task(name="score-heldout", cache_policy=CACHED, persist_result=True)
def score_heldout(ref: CheckpointRef, heldout: TokensRef) -> HeldoutScore:
    """Perplexity on the distillation corpus's held-out slice, overall and per source."""
    start = stage_start()
    scored = checkpoint_heldout_perplexity(ref, heldout)
    return HeldoutScore(scored["perplexity"], scored["sources"], scored["tokens"], stage_cost(start))


@task(name="measure-speed", cache_policy=CACHED, persist_result=True)
def measure_speed(refs: dict[str, CheckpointRef], speed: SpeedConfig) -> SpeedProfiles:
    """Profile every checkpoint in one task, timed in interleaved rounds, so no other stage
    competes for the CPU and the machine's drift falls on every model alike; each distinct
    architecture is timed once (pruned and distilled share one timing)."""
    start = stage_start()
    return SpeedProfiles(profile_checkpoints(refs, speed), stage_cost(start))
