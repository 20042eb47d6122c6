"""Tasks that measure checkpoints: lm-eval accuracy and generation speed."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from tailor.common.console import Progress
from tailor.common.resources import stage_cost, stage_start
from tailor.config.settings import DataConfig, EvalConfig, SpeedConfig
from tailor.data.tokenised import TokensRef
from tailor.evaluate.harness import evaluate_checkpoint, evaluation_file
from tailor.evaluate.perplexity import checkpoint_heldout_perplexity
from tailor.evaluate.speed import profile_checkpoints
from tailor.store.checkpoint import CheckpointRef

from ._common import CACHED, prefect_key
from .records import Evaluation, HeldoutScore, SpeedProfiles


@task(name="evaluate-model", cache_policy=CACHED, persist_result=True)
def evaluate_model(
    ref: CheckpointRef, eval_cfg: EvalConfig, data: DataConfig, work_dir: str, label: str = "model", signature: str = ""
) -> Evaluation:
    """lm-eval metrics of one checkpoint; per-item scores are kept in the work folder.

    ``signature`` (``evaluation_signature``: the data's and task files' content, lm-eval's
    version) is part of the cache key, so changed data is never served from cache. A
    progress artifact keyed by ``label`` moves as requests are scored.
    """
    out = evaluation_file(ref, eval_cfg, data, work_dir)
    start = stage_start()
    progress = create_progress_artifact(
        progress=0.0,
        key=f"evaluation-progress-{prefect_key(label)}",
        description=f"Evaluation of {label}: share of requests scored",
    )
    lines: list[Progress] = []

    def on_progress(done: int, total: int) -> None:
        update_progress_artifact(progress, 100.0 * done / total)
        if not lines:
            lines.append(Progress(f"evaluate-{label}", total, "requests"))
        lines[0].update(done)

    result = evaluate_checkpoint(ref.verify(), eval_cfg, data, out, on_progress)
    return Evaluation(result["metrics"], result["n_samples"], str(out), stage_cost(start))


@task(name="score-heldout", cache_policy=CACHED, persist_result=True)
def score_heldout(ref: CheckpointRef, heldout: TokensRef) -> HeldoutScore:
    """Perplexity on the distillation corpus's held-out slice, overall and per source."""
    start = stage_start()
    scored = checkpoint_heldout_perplexity(ref, heldout)
    return HeldoutScore(scored["perplexity"], scored["sources"], scored["tokens"], stage_cost(start))


@task(name="measure-speed", cache_policy=CACHED, persist_result=True)
def measure_speed(refs: dict[str, CheckpointRef], speed: SpeedConfig) -> SpeedProfiles:
    """Profile every checkpoint in one task, timed in interleaved rounds, so no other stage
    competes for the CPU and the machine's drift falls on every model alike."""
    start = stage_start()
    return SpeedProfiles(profile_checkpoints(refs, speed), stage_cost(start))
