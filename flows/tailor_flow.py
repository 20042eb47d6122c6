"""The tailoring DAG: evaluate, prune, distil, compare, register, promote.

    materialize ─┬─ evaluate(original) ───────────────────────────┐
                 └─ prune ─┬─ evaluate(pruned) ───────────────────┤
                           └─ distill ─ evaluate(distilled) ──────┼─ measure-speed ─ compare ─ register ─ promote
No maths here: the flow reads the config, opens the MLflow parent run and wires tasks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from tailor import tracking
from tailor.checkpoint import CheckpointRef
from tailor.config import TailorConfig, load_config
from tailor.console import LOGGER, Stages
from tailor.corpus import corpus_datasets, heldout_settings
from tailor.evaluation import evaluation_datasets, evaluation_signature
from tailor.importance import SCORED_STRATEGIES
from tailor.preflight import preflight
from tailor.promotion import evaluation_tags, version_description
from tasks.measure import evaluate_model, measure_speed, score_heldout
from tasks.models import cache_teacher_topk, distill_model, materialize_model, prune_model, score_layers
from tasks.promotion import promote_model
from tasks.report import compare_models, record_promotion
from tasks.tracking import log_stage, register_model


class StageFailed(RuntimeError):
    """A stage raised; the message names it. Earlier stages stay cached."""


@flow(name="llm-tailor", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def tailor_flow(profile: str = "quick", overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """Run the whole cycle for a profile (+ ``section.key=value`` overrides); returns report paths."""
    start = time.perf_counter()
    cfg = load_config(profile, overrides or [])
    preflight(cfg)
    logger = get_run_logger()
    uri = cfg.tracking_uri
    flow_run_name = get_run_context().flow_run.name
    client, exp_id, parent = tracking.start_parent_run(
        uri, cfg.tracking.experiment, cfg.work_dir, f"{cfg.profile}-{flow_run_name}",
        tags={"tailor.profile": cfg.profile, "prefect.flow_run": flow_run_name})
    tracking.log_params(client, parent, cfg.model_dump())
    tracking.log_datasets(client, parent, evaluation_datasets(cfg.eval, cfg.data) + corpus_datasets(cfg.distill, cfg.data))
    log = lambda stage, **kw: log_stage(uri, exp_id, parent, stage, **kw)  # noqa: E731
    create_link_artifact(key="mlflow-parent-run", link=run_link(uri, exp_id, parent),
                         description="MLflow parent run of this flow run")
    stages = Stages(stage_names(cfg))
    LOGGER.info(f"profile {cfg.profile}: Prefect flow run {flow_run_name!r}, MLflow run {parent}")

    try:
        stages.start("materialize")
        materialized = run_intact(materialize_model, cfg.model, cfg.work_dir)
        base = materialized["ref"]
        log("materialize", params=cfg.model.model_dump(), metrics={"seconds": materialized["seconds"]})
        stages.done("materialize", base.path)

        evals = {"original": evaluate_stage(cfg, stages, "original", base)}
        scores = None
        if cfg.prune.strategy in SCORED_STRATEGIES:
            stages.start("score-layers")
            scored = score_layers(base, cfg.prune, (cfg.prune.strategy,), cfg.distill, cfg.data, cfg.work_dir)
            scores = scored["scores"]
            log("score-layers", params=cfg.prune.model_dump(), metrics={"seconds": scored["seconds"]},
                artifacts=[scored["file"]])
            stages.done("score-layers")
        stages.start("prune")
        pruned = run_intact(prune_model, base, cfg.prune, cfg.work_dir, scores)
        log("prune", params=cfg.prune.model_dump(), metrics={"params_before": pruned["params_before"],
            "params_after": pruned["params_after"], "layers_removed": len(pruned["removed_layers"])},
            artifacts=[pruned["plot"]] if pruned["plot"] else None)
        stages.done("prune", f"layers {pruned['removed_layers']} removed, "
                             f"{pruned['params_before']:,} -> {pruned['params_after']:,} parameters")
        evals["pruned"] = evaluate_stage(cfg, stages, "pruned", pruned["ref"])
        teacher_cache = None
        if cfg.distill.teacher_topk:
            stages.start("cache-teacher-topk")
            teacher_cache = cache_teacher_topk(base, cfg.distill, cfg.data, cfg.work_dir)
            log("cache-teacher-topk", params={"k": cfg.distill.teacher_topk},
                metrics={"seconds": teacher_cache["seconds"], "mib": teacher_cache["mib"]})
            stages.done("cache-teacher-topk", f"{teacher_cache['mib']:.0f} MiB")
        stages.start("distill")
        distilled = run_intact(distill_model, base, pruned["ref"], cfg.distill, cfg.data, cfg.work_dir,
                               teacher_cache["path"] if teacher_cache else None)
        kd = distilled["record"]
        log("distill", params=cfg.distill.model_dump(),
            series={"kd_loss": list(enumerate(kd["losses"], 1)), "heldout_perplexity": kd["heldout_curve"]},
            metrics={k: v for k, v in kd.items() if k not in ("losses", "heldout_curve")})
        stages.done("distill", f"{kd['optimizer_steps']} steps, KD loss {kd['losses'][0]:.3f} -> {kd['losses'][-1]:.3f}")
        refs = {"original": base, "pruned": pruned["ref"], "distilled": distilled["ref"]}
        heldout = {}
        if cfg.distill.heldout_docs:
            stages.start("score-heldout")
            for name, ref in refs.items():
                heldout[name] = score_heldout.with_options(task_run_name=f"score-heldout-{name}")(
                    ref, heldout_settings(cfg.distill), cfg.data)
            log("score-heldout", params={"heldout_docs": cfg.distill.heldout_docs},
                metrics={name: {"perplexity": h["perplexity"], **{f"perplexity.{Path(s).stem}": v
                                                                   for s, v in h["sources"].items()}}
                         for name, h in heldout.items()})
            stages.done("score-heldout", "perplexity " + ", ".join(f"{n} {h['perplexity']:.1f}"
                                                                     for n, h in heldout.items()))
        evals["distilled"] = evaluate_stage(cfg, stages, "distilled", distilled["ref"])
        results = {}
        for name, future in evals.items():
            stages.current = f"evaluate-{name}"
            results[name] = future.result()
            log(stages.current, params=cfg.eval.model_dump(), metrics=_metric_values(results[name]["metrics"]),
                artifacts=[results[name]["items_file"]])
            if cfg.runner.concurrent:
                stages.done(stages.current, accuracy_summary(results[name]["metrics"]))
        stages.start("measure-speed")
        profiles = measure_speed(refs, cfg.speed)
        log("measure-speed", params=cfg.speed.model_dump(),
            metrics={name: {k: v for k, v in p.items() if isinstance(v, (int, float))} for name, p in profiles.items()})
        stages.done("measure-speed", ", ".join(f"{n} {p['tokens_per_s']:.1f} tokens/s" for n, p in profiles.items()))
        stages.start("compare")
        out = Path(out_dir).expanduser().resolve() if out_dir else Path(cfg.work_dir) / "reports" / flow_run_name
        report = compare_models(profiles, results, {
            "profile": cfg.profile, "config": cfg.model_dump(), "eval_limit": cfg.eval.limit,
            "pruning": {k: v for k, v in pruned.items() if k != "ref"},
            "distillation": kd,
            "heldout_perplexity": {name: {k: h[k] for k in ("perplexity", "sources", "tokens")}
                                   for name, h in heldout.items()},
            # Compute time and process peak memory of each stage when it ran (a cached
            # stage keeps its original figures).
            "stages": _stage_costs({"materialize": materialized, "prune": pruned,
                                    **({"cache-teacher-topk": teacher_cache} if teacher_cache else {}),
                                    "distill": distilled,
                                    **{f"score-heldout-{n}": h for n, h in heldout.items()},
                                    **{f"evaluate-{n}": r for n, r in results.items()},
                                    **{f"measure-speed-{n}": p for n, p in profiles.items()}}),
            "checkpoints": {k: {"path": r.path, "fingerprint": r.fingerprint} for k, r in refs.items()},
            "mlflow": {"tracking_uri": uri, "experiment_id": exp_id, "parent_run_id": parent},
            "flow_seconds_before_report": time.perf_counter() - start,
        }, str(out))
        json_path, md_path = report["report_json"], report["report_md"]
        log("compare", params={"out_dir": str(out)},
            artifacts=[json_path, md_path, *(str(out / f) for f in report["figures"].values())],
            metrics={name: {"mean_acc_retention_pct": c["mean_acc_retention_pct"], "speedup": c["speedup"]}
                     for name, c in report["vs_original"].items()})
        stages.done("compare", f"{md_path}; " + comparison_summary(report))
        stages.start("register")
        eval_signature = evaluation_signature(cfg.eval, cfg.data)
        version = register_model(uri, exp_id, parent, distilled["ref"], cfg.tracking.registered_model,
                                 cfg.tracking.alias, {"profile": cfg.profile,
                                                      **evaluation_tags(report, eval_signature)},
                                 version_description(json.loads(Path(json_path).read_text()), md_path))
        stages.done("register", f"{cfg.tracking.registered_model} version {version} @{cfg.tracking.alias}")
        decision = None
        if cfg.promotion.enabled:
            stages.start("promote")
            decision = promote_model(uri, cfg.tracking.registered_model, version, cfg.promotion, cfg.work_dir)
            record_promotion(json_path, decision)
            client.set_tag(parent, "tailor.promotion", "promoted" if decision["promoted"] else "rejected")
            stages.done("promote", f"{'promoted' if decision['promoted'] else 'not promoted'} "
                                   f"(reference: {decision['reference']}): " + "; ".join(decision["reasons"]))
    except Exception as exc:
        stage = stages.current
        logger.error(f"stage {stage} failed: {exc}")
        client.set_tag(parent, "tailor.failed_stage", stage)
        log_stage(uri, exp_id, parent, stage, params={}, metrics={}, failed=True)
        tracking.end_run(client, parent, failed=True)
        raise StageFailed(f"stage {stage!r} failed: {exc}") from exc
    tracking.log_metrics(client, parent, {"flow_seconds": time.perf_counter() - start})
    tracking.end_run(client, parent)
    return {"report_json": json_path, "report_md": md_path, "registered_model": cfg.tracking.registered_model,
            "version": version, "alias": cfg.tracking.alias, "parent_run_id": parent, "promotion": decision}


def run_intact(task, *args):
    """Run a checkpoint-producing task; a cached result whose checkpoint folder has since been
    deleted or edited is recomputed instead of handed on (where it would fail later, or
    feed stale weights to stages keyed by its fingerprint)."""
    result = task(*args)
    if _checkpoint_intact(result["ref"]):
        return result
    get_run_logger().warning(f"{task.name}: cached checkpoint {result['ref'].path} is missing or changed; recomputing")
    return task.with_options(refresh_cache=True)(*args)


def _checkpoint_intact(ref: CheckpointRef) -> bool:
    try:
        ref.verify(contents=True)
    except (OSError, RuntimeError):
        return False
    return True


class _Done:
    """The ``.result()`` interface of a future, for a task already run in the flow's thread."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def evaluate_stage(cfg: TailorConfig, stages: Stages, name: str, ref: CheckpointRef):
    """The evaluation task for one model: submitted beside other stages with
    ``runner.concurrent``, else run now (one stage at a time, bounded memory)."""
    task = evaluate_model.with_options(task_run_name=f"evaluate-{name}")
    stages.start(f"evaluate-{name}")
    if cfg.runner.concurrent:
        return task.submit(ref, cfg.eval, cfg.data, cfg.work_dir, name, evaluation_signature(cfg.eval, cfg.data))
    result = completed(task)(ref, cfg.eval, cfg.data, cfg.work_dir, name, evaluation_signature(cfg.eval, cfg.data))
    stages.done(f"evaluate-{name}", accuracy_summary(result.result()["metrics"]))
    return result


def stage_names(cfg: TailorConfig) -> list[str]:
    """The flow's stages in the order they start, for "stage k of n"."""
    return ["materialize", "evaluate-original",
            *(["score-layers"] if cfg.prune.strategy in SCORED_STRATEGIES else []),
            "prune", "evaluate-pruned",
            *(["cache-teacher-topk"] if cfg.distill.teacher_topk else []),
            "distill", *(["score-heldout"] if cfg.distill.heldout_docs else []),
            "evaluate-distilled", "measure-speed", "compare", "register",
            *(["promote"] if cfg.promotion.enabled else [])]


def accuracy_summary(metrics: dict) -> str:
    """``arc_easy acc 0.604 ± 0.022, ...`` (± one standard error)."""
    parts = []
    for task, per_metric in metrics.items():
        if "acc" in per_metric:
            acc = per_metric["acc"]
            parts.append(f"{task} acc {acc['value']:.3f}" + (f" ± {acc['stderr']:.3f}" if acc.get("stderr") else ""))
    return ", ".join(parts)


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


def completed(task):
    """Run ``task`` at once in the flow's thread, returning a future-like ``.result()`` holder
    (``runner.concurrent=false``: one stage at a time, bounded memory)."""
    return lambda *args: _Done(task(*args))


def _stage_costs(records: dict[str, dict]) -> dict[str, dict]:
    return {stage: {"seconds": r["seconds"], "peak_rss_gib": r.get("peak_rss_gib")} for stage, r in records.items()}


def _metric_values(metrics: dict) -> dict[str, float]:
    flat = {}
    for task, per_metric in metrics.items():
        for metric, score in per_metric.items():
            flat[f"{task}.{metric}"] = score["value"]
            if score.get("stderr") is not None:
                flat[f"{task}.{metric}_stderr"] = score["stderr"]
    return flat


def run_link(uri: str, exp_id: str, run_id: str) -> str:
    base = uri if uri.startswith("http") else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
