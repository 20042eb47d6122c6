"""The tailoring DAG: evaluate, prune, distil, compare, register, promote.

    materialize ─ tokenise ─ prune ─ distill ─ evaluate(original, pruned, distilled) ─ measure-speed
                  ─ compare ─ register ─ promote
The three models are evaluated together, on the same documents, their shared layers run once.
No maths here: the flow reads the config, opens the MLflow parent run and wires tasks.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_link_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import (
    FAILURE_HOOKS,
    RunContext,
    accuracy_summary,
    metric_values,
    run_intact,
    run_link,
    send_console_to_prefect,
    track,
)
from tailor.common.console import LOGGER, Stages
from tailor.common.layout import WorkDir
from tailor.config.settings import TEACHER_SOURCE, DistillConfig, TailorConfig, load_config
from tailor.data.corpus import corpus_datasets, corpus_fingerprint
from tailor.data.tokenised import TokensRef
from tailor.distill.activation_cache import uses_activation_cache
from tailor.evaluate.harness import evaluation_datasets, evaluation_signature
from tailor.evaluate.joint import StopRule
from tailor.models.sources import source_fingerprint
from tailor.preflight import preflight
from tailor.prune.importance import SCORED_STRATEGIES
from tailor.registry import tracking
from tailor.registry.promotion import evaluation_tags, version_description
from tailor.store.checkpoint import CheckpointRef
from tasks.measure import evaluate_models, measure_speed, score_heldout
from tasks.models import (
    cache_activations,
    cache_teacher_topk,
    distill_model,
    generate_teacher_text,
    materialize_model,
    prune_model,
    score_layers,
    tokenise,
)
from tasks.promotion import promote_model
from tasks.records import (
    Activations,
    Distilled,
    Evaluations,
    HeldoutScore,
    Materialized,
    Pruned,
    SpeedProfiles,
    TeacherCache,
    TeacherText,
    Tokenised,
)
from tasks.report import compare_models, record_promotion
from tasks.tracking import register_model


@dataclass
class Models:
    """What the model-producing stages returned; evaluations may still be running."""

    materialized: Materialized
    pruned: Pruned
    phases: list[Distilled]
    """One per distillation phase (distill.then adds phases); the last one is the distilled model."""
    teacher_cache: TeacherCache | None = None
    activations: Activations | None = None
    heldout: dict[str, HeldoutScore] = field(default_factory=dict)

    @property
    def distilled(self) -> Distilled:
        return self.phases[-1]

    @property
    def refs(self) -> dict[str, CheckpointRef]:
        return {"original": self.materialized.ref, "pruned": self.pruned.ref, "distilled": self.distilled.ref}


@flow(name="llm-tailor", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False, **FAILURE_HOOKS)
def tailor_flow(profile: str = "quick", overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """Run the whole cycle for a profile (+ ``section.key=value`` overrides); returns report paths."""
    start = time.perf_counter()
    send_console_to_prefect()
    cfg = load_config(profile, overrides or [])
    preflight(cfg, out_dir)  # the report folder too: it is written last
    run = open_run(cfg)  # a failure from here on is closed in MLflow by FAILURE_HOOKS
    models = build_models(run)
    results = evaluate_all(run, models.refs)
    speed = time_models(run, models.refs)
    report = compare(run, models, results, speed, out_dir, time.perf_counter() - start)
    version, decision = register_and_promote(run, models.distilled.ref, report)
    run.close(time.perf_counter() - start)
    return {
        "report_json": report["report_json"],
        "report_md": report["report_md"],
        "registered_model": cfg.tracking.registered_model,
        "version": version,
        "alias": cfg.tracking.alias,
        "parent_run_id": run.parent_id,
        "promotion": decision,
    }


def open_run(cfg: TailorConfig) -> RunContext:
    """The MLflow parent run (settings, dataset inputs), its link in Prefect, the stage lines."""
    flow_run_name = get_run_context().flow_run.name
    client, exp_id, parent = tracking.start_parent_run(
        cfg.tracking_uri,
        cfg.tracking.experiment,
        cfg.work_dir,
        f"{cfg.profile}-{flow_run_name}",
        tags={"tailor.profile": cfg.profile, "prefect.flow_run": flow_run_name},
    )
    run = track(
        RunContext(cfg, client, exp_id, parent, Stages(stage_names(cfg)), evaluation_signature(cfg.eval, cfg.data))
    )
    tracking.log_params(client, parent, cfg.settings_record())
    tracking.log_datasets(
        client, parent, evaluation_datasets(cfg.eval, cfg.data) + corpus_datasets(cfg.distill, cfg.data)
    )
    create_link_artifact(
        key="mlflow-parent-run",
        link=run_link(cfg.tracking_uri, exp_id, parent),
        description="MLflow parent run of this flow run",
    )
    LOGGER.info(f"profile {cfg.profile}: Prefect flow run {flow_run_name!r}, MLflow run {parent}")
    return run


def build_models(run: RunContext) -> Models:
    """Materialise, prune and distil, and score each model on the held-out corpus."""
    cfg = run.cfg
    materialized = materialize_base(run)
    base = materialized.ref
    tokens = tokenise_corpus(run, base)
    pruned = prune(run, base, tokens)
    teacher_cache = activations = None
    if uses_logit_cache(cfg.distill):
        with run.stage("cache-teacher-topk") as stage:
            teacher_cache = run_intact(cache_teacher_topk, base, cfg.distill, tokens.train, cfg.work_dir)
            run.log(
                stage.name,
                params={"k": cfg.distill.teacher_topk},
                metrics={"seconds": teacher_cache.cost.seconds, "mib": teacher_cache.mib},
            )
            stage.detail = f"{teacher_cache.mib:.0f} MiB"
    if uses_activation_cache(cfg.distill):
        activations = cache_teacher_activations(run, base, pruned.ref, tokens)
    phases = []
    student = pruned.ref
    for i, phase in enumerate(cfg.distill.phases()):
        phases.append(distill_phase(run, i, base, student, phase, tokens, teacher_cache, activations))
        student = phases[-1].ref
    models = Models(materialized, pruned, phases, teacher_cache, activations)
    models.heldout = score_heldout_all(run, models.refs, tokens.heldout)
    return models


def objective_name(distill: DistillConfig) -> str:
    """``hidden``, or a mix as ``hidden+0.1*topk_logits``."""
    weights = distill.objective_weights()
    return "+".join(name if w == 1 else f"{w:g}*{name}" for name, w in weights.items())


def uses_logit_cache(distill: DistillConfig) -> bool:
    """Logit KD from the teacher's cached top-k (``topk_logits`` reads its top-k from the
    activation cache or the live teacher instead)."""
    return bool(distill.teacher_topk) and distill.objective == "logits"


def cache_teacher_activations(
    run: RunContext, teacher: CheckpointRef, student: CheckpointRef, tokens: Tokenised
) -> Activations:
    """The teacher's targets and the shared trunk's output, once for every epoch of the first phase."""
    cfg = run.cfg
    with run.stage("cache-activations") as stage:
        activations = run_intact(cache_activations, teacher, student, cfg.distill, tokens.train, cfg.work_dir)
        run.log(
            stage.name,
            params={"path": activations.ref.path},
            metrics={"seconds": activations.cost.seconds, "mib": activations.mib},
        )
        stage.detail = f"{activations.mib:.0f} MiB"
    return activations


def phase_stage(index: int) -> str:
    """The stage name of distillation phase ``index`` (0 is the first; distill.then adds the rest)."""
    return "distill" if index == 0 else f"distill-then-{index}"


def distill_phase(
    run: RunContext,
    index: int,
    teacher: CheckpointRef,
    student: CheckpointRef,
    phase: DistillConfig,
    tokens: Tokenised,
    teacher_cache: TeacherCache | None,
    activations: Activations | None = None,
) -> Distilled:
    """Distillation phase ``index`` from ``student``; only the first runs from the teacher's caches."""
    cfg = run.cfg
    topk = teacher_cache.path if teacher_cache and index == 0 else None
    cached = activations.ref if activations and index == 0 else None
    task = distill_model.with_options(task_run_name=f"distill-model-then-{index}") if index else distill_model
    with run.stage(phase_stage(index)) as stage:
        distilled = run_intact(
            task,
            teacher,
            student,
            phase,
            cfg.data,
            tokens.train,
            tokens.heldout,
            cfg.work_dir,
            topk,
            cached,
        )
        kd = distilled.record
        run.log(
            stage.name,
            params=phase.model_dump(),
            series={
                "kd_loss": list(enumerate(kd.losses, 1)),
                "grad_norm": list(enumerate(kd.grad_norms, 1)),
                "heldout_perplexity": kd.heldout_curve,
            },
            metrics=kd.summary(),
        )
        done = [f"linear map in place of layers {kd.linear_map['replaced']}"] if kd.linear_map else []
        if kd.losses:
            done.append(
                f"{kd.optimizer_steps} steps, {objective_name(phase)} loss {kd.losses[0]:.3f} -> {kd.losses[-1]:.3f}"
            )
        stage.detail = ", ".join(done) or "nothing trained"
    return distilled


def materialize_base(run: RunContext) -> Materialized:
    """The base checkpoint; a local model folder's content is one of the task's inputs (its cache key)."""
    cfg = run.cfg
    with run.stage("materialize") as stage:
        materialized = run_intact(materialize_model, cfg.model, cfg.work_dir, source_fingerprint(cfg.model))
        run.log(stage.name, params=cfg.model.model_dump(), metrics={"seconds": materialized.cost.seconds})
        stage.detail = materialized.ref.path
    return materialized


def tokenise_corpus(run: RunContext, base: CheckpointRef) -> Tokenised:
    """The corpus tokenised once for layer scoring, the teacher cache, distillation and held-out scoring."""
    cfg = run.cfg
    teacher_text = generate_text(run, base) if TEACHER_SOURCE in cfg.distill.corpus_mix else None
    with run.stage("tokenise") as stage:
        tokens = run_intact(
            tokenise,
            base,
            cfg.distill,
            cfg.prune,
            cfg.data,
            cfg.work_dir,
            # The corpus files' content, so the task's cache key changes when one is edited.
            corpus_fingerprint(cfg.distill, cfg.data),
            teacher_text.tokens if teacher_text else None,
        )
        run.log(
            stage.name,
            params={
                "num_samples": cfg.distill.num_samples,
                "seq_len": cfg.distill.seq_len,
                "calibration_samples": cfg.prune.calibration_samples,
                "calibration_seq_len": cfg.prune.calibration_seq_len,
                "heldout_docs": cfg.distill.heldout_docs,
            },
            metrics={"seconds": tokens.cost.seconds},
        )
        stage.detail = str(Path(tokens.train.path).parent)
    return tokens


def generate_text(run: RunContext, base: CheckpointRef) -> TeacherText:
    """The teacher's own text, its share of the training samples (a corpus source)."""
    cfg = run.cfg
    with run.stage("generate-text") as stage:
        text = generate_teacher_text(base, cfg)
        run.log(
            stage.name,
            params={**cfg.generate.model_dump(), "sequences": text.sequences, "seq_len": cfg.distill.seq_len},
            metrics={"seconds": text.cost.seconds},
        )
        tracking.log_datasets(
            run.client,
            run.parent_id,
            [
                {
                    "name": "teacher_text",
                    "digest": text.tokens.fingerprint,
                    "source": text.tokens.path,
                    "context": "distillation",
                }
            ],
        )
        stage.detail = f"{text.sequences} sequences of {cfg.distill.seq_len} tokens"
    return text


def prune(run: RunContext, base: CheckpointRef, tokens: Tokenised) -> Pruned:
    """Score the layers when the strategy needs scores, then remove the chosen ones."""
    cfg = run.cfg
    scores = None
    if cfg.prune.strategy in SCORED_STRATEGIES:
        with run.stage("score-layers") as stage:
            scored = score_layers(base, cfg.prune, (cfg.prune.strategy,), tokens.calibration, cfg.work_dir)
            scores = scored.scores
            run.log(
                stage.name,
                params=cfg.prune.model_dump(),
                metrics={"seconds": scored.cost.seconds},
                artifacts=[scored.file],
            )
    with run.stage("prune") as stage:
        pruned = run_intact(prune_model, base, cfg.prune, cfg.work_dir, scores)
        run.log(
            stage.name,
            params=cfg.prune.model_dump(),
            metrics={
                "params_before": pruned.params_before,
                "params_after": pruned.params_after,
                "layers_removed": len(pruned.removed_layers),
            },
            artifacts=[pruned.plot] if pruned.plot else None,
        )
        stage.detail = (
            f"layers {pruned.removed_layers} removed, {pruned.params_before:,} -> {pruned.params_after:,} parameters"
        )
    return pruned


def score_heldout_all(run: RunContext, refs: dict[str, CheckpointRef], tokens: TokensRef) -> dict[str, HeldoutScore]:
    """Held-out corpus perplexity of every model ({} when ``distill.heldout_docs`` is 0)."""
    cfg = run.cfg
    if not cfg.distill.heldout_docs:
        return {}
    with run.stage("score-heldout") as stage:
        heldout = {
            name: score_heldout.with_options(task_run_name=f"{stage.name}-{name}")(ref, tokens)
            for name, ref in refs.items()
        }
        run.log(
            stage.name,
            params={"heldout_docs": cfg.distill.heldout_docs},
            metrics={
                name: {"perplexity": h.perplexity, **{f"perplexity.{Path(s).stem}": v for s, v in h.sources.items()}}
                for name, h in heldout.items()
            },
        )
        stage.detail = "perplexity " + ", ".join(f"{n} {h.perplexity:.1f}" for n, h in heldout.items())
    return heldout


def evaluate_all(run: RunContext, refs: dict[str, CheckpointRef]) -> Evaluations:
    """The three models scored together on the same documents; with ``eval.sequential``, each
    task until the promotion gate's question for it is answered."""
    cfg = run.cfg
    rule = (
        StopRule(
            "original",
            "distilled",
            cfg.promotion.max_task_drop,
            cfg.eval.sequential_block,
            futility=cfg.eval.sequential_futility,
        )
        if cfg.eval.sequential
        else None
    )
    with run.stage("evaluate") as stage:
        evals = evaluate_models(refs, cfg.eval, cfg.data, cfg.work_dir, rule, run.signature)
        if any(not Path(e.items_file).exists() for e in evals.models.values()):
            # A cached record whose per-document scores were deleted: computed again (from the
            # stored answers where they are left), not handed to the report to fail there.
            evals = evaluate_models.with_options(refresh_cache=True)(
                refs, cfg.eval, cfg.data, cfg.work_dir, rule, run.signature
            )
        for name, result in evals.models.items():
            run.log(
                f"evaluate-{name}",
                params=cfg.eval.model_dump(),
                metrics=metric_values(result.metrics),
                artifacts=[result.items_file],
            )
        stage.detail = "; ".join(
            [f"{name}: {accuracy_summary(r.metrics)}" for name, r in evals.models.items()]
            + [stopping_summary(evals.stopping)]
        )
    return evals


def stopping_summary(stopping: dict[str, dict]) -> str:
    """``documents per task: arc_easy 300 (beyond), ...``"""
    return "documents per task: " + ", ".join(f"{t} {s['documents']} ({s['reason']})" for t, s in stopping.items())


def time_models(run: RunContext, refs: dict[str, CheckpointRef]) -> SpeedProfiles:
    """Generation speed of every model, timed in interleaved rounds once nothing else runs."""
    with run.stage("measure-speed") as stage:
        speed = measure_speed(refs, run.cfg.speed)
        run.log(
            stage.name,
            params=run.cfg.speed.model_dump(),
            metrics={
                name: {k: v for k, v in p.items() if isinstance(v, (int, float))} for name, p in speed.profiles.items()
            },
        )
        stage.detail = ", ".join(f"{n} {p['tokens_per_s']:.1f} tokens/s" for n, p in speed.profiles.items())
    return speed


def compare(
    run: RunContext,
    models: Models,
    results: Evaluations,
    speed: SpeedProfiles,
    out_dir: str | None,
    seconds_so_far: float,
) -> dict:
    """The report files and artifacts; returns the report with its paths."""
    with run.stage("compare") as stage:
        out = (
            Path(out_dir).expanduser().resolve()
            if out_dir
            else WorkDir(run.cfg.work_dir).reports / get_run_context().flow_run.name
        )
        report = compare_models(
            speed.profiles, results.models, report_facts(run, models, results, speed, seconds_so_far), str(out)
        )
        run.log(
            stage.name,
            params={"out_dir": str(out)},
            artifacts=[report["report_json"], report["report_md"], *(str(out / f) for f in report["figures"].values())],
            metrics={
                name: {"mean_acc_retention_pct": c["mean_acc_retention_pct"], "speedup": c["speedup"]}
                for name, c in report["vs_original"].items()
            },
        )
        stage.detail = f"{report['report_md']}; " + comparison_summary(report)
    return report


def report_facts(
    run: RunContext, models: Models, results: Evaluations, speed: SpeedProfiles, seconds_so_far: float
) -> dict:
    """What the report holds besides the models' profiles and evaluations: settings, pruning,
    distillation, held-out scores, stage costs, where things are."""
    cfg, heldout = run.cfg, models.heldout
    return {
        "profile": cfg.profile,
        "config": cfg.settings_record(),
        "eval_limit": cfg.eval.limit,
        "pruning": {
            "removed_layers": models.pruned.removed_layers,
            "params_before": models.pruned.params_before,
            "params_after": models.pruned.params_after,
            "strategy": models.pruned.strategy,
            "plot": models.pruned.plot,
        },
        "distillation": models.phases[0].record.to_dict(),
        # Later phases (distill.then): the settings each changed and what it trained.
        "distillation_then": [
            {"settings": changes, **phase.record.to_dict()}
            for changes, phase in zip(cfg.distill.then, models.phases[1:], strict=True)
        ],
        "heldout_perplexity": {
            name: {"perplexity": h.perplexity, "sources": h.sources, "tokens": h.tokens} for name, h in heldout.items()
        },
        # Compute time and process peak memory of each stage when it ran (a cached stage
        # keeps its original figures).
        "stages": _stage_costs(
            {
                "materialize": models.materialized,
                "prune": models.pruned,
                **({"cache-teacher-topk": models.teacher_cache} if models.teacher_cache else {}),
                **({"cache-activations": models.activations} if models.activations else {}),
                **{phase_stage(i): phase for i, phase in enumerate(models.phases)},
                **{f"score-heldout-{n}": h for n, h in heldout.items()},
                "evaluate": results,
                "measure-speed": speed,
            }
        ),
        "evaluation": {
            "stopping": results.stopping,
            "trunk_depths": results.trunk_depths,
            "scored_requests": results.scored_requests,
            "sequential": cfg.eval.sequential,
        },
        "checkpoints": {k: {"path": r.path, "fingerprint": r.fingerprint} for k, r in models.refs.items()},
        "mlflow": {
            "tracking_uri": cfg.tracking_uri,
            "experiment_id": run.experiment_id,
            "parent_run_id": run.parent_id,
        },
        "flow_seconds_before_report": seconds_so_far,
    }


def register_and_promote(run: RunContext, distilled: CheckpointRef, report: dict) -> tuple[str, dict | None]:
    """Register the distilled checkpoint under the challenger alias, then run the gate."""
    cfg = run.cfg
    with run.stage("register") as stage:
        tags = {"profile": cfg.profile, **evaluation_tags(report, run.signature)}
        description = version_description(json.loads(Path(report["report_json"]).read_text()), report["report_md"])
        version = register_model(
            cfg.tracking_uri,
            run.experiment_id,
            run.parent_id,
            distilled,
            cfg.tracking.registered_model,
            cfg.tracking.alias,
            tags,
            description,
        )
        stage.detail = f"{cfg.tracking.registered_model} version {version} @{cfg.tracking.alias}"
    if not cfg.promotion.enabled:
        return version, None
    with run.stage("promote") as stage:
        decision = promote_model(cfg.tracking_uri, cfg.tracking.registered_model, version, cfg.promotion)
        record_promotion(report["report_json"], decision)
        run.client.set_tag(run.parent_id, "tailor.promotion", "promoted" if decision["promoted"] else "rejected")
        stage.detail = (
            f"{'promoted' if decision['promoted'] else 'not promoted'} "
            f"(reference: {decision['reference']}): " + "; ".join(decision["reasons"])
        )
    return version, decision


def stage_names(cfg: TailorConfig) -> list[str]:
    """The flow's stages in the order they start, for "stage k of n"."""
    return [
        "materialize",
        *(["generate-text"] if TEACHER_SOURCE in cfg.distill.corpus_mix else []),
        "tokenise",
        *(["score-layers"] if cfg.prune.strategy in SCORED_STRATEGIES else []),
        "prune",
        *(["cache-teacher-topk"] if uses_logit_cache(cfg.distill) else []),
        *(["cache-activations"] if uses_activation_cache(cfg.distill) else []),
        *(phase_stage(i) for i in range(1 + len(cfg.distill.then))),
        *(["score-heldout"] if cfg.distill.heldout_docs else []),
        "evaluate",
        "measure-speed",
        "compare",
        "register",
        *(["promote"] if cfg.promotion.enabled else []),
    ]


def comparison_summary(report: dict) -> str:
    """The headline a person acts on, with its intervals: what distillation changed vs the
    pruned model (pooled accuracy) and each model's speed-up vs the original."""
    parts = []
    pooled = (report.get("healing") or {}).get("pooled")
    if pooled and pooled.get("delta_ci95"):
        lo, hi = pooled["delta_ci95"]
        verdict = "better" if lo > 0 else "worse" if hi < 0 else "cannot tell"
        parts.append(f"distilled - pruned accuracy {pooled['delta_vs_pruned']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({verdict})")
    for name, c in report["vs_original"].items():
        ci = " [{:.2f}, {:.2f}]".format(*c["speedup_ci95"]) if c.get("speedup_ci95") else ""
        parts.append(f"{name} speed-up {c['speedup']:.2f}x{ci}")
    return "; ".join(parts)


def _stage_costs(records: dict) -> dict[str, dict]:
    return {stage: {"seconds": r.cost.seconds, "peak_rss_gib": r.cost.peak_rss_gib} for stage, r in records.items()}
