"""The pruning sweep: every (strategy, layer count) pruned, evaluated and timed against the original.

    materialize ─┬─ evaluate(original) ───────────────────────────────┐
                 ├─ score-layers ─┬─ prune(s, n) ─ evaluate(s, n) ────┼─ measure-speed ─ sweep table + plot
                 └────────────────┘                                   │
                                                        (optional) the whole cycle with the best (s, n)
Every stage is the main flow's cached task, so the original's evaluation and any
combination the main flow has already run are reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import (
    FAILURE_HOOKS,
    RunContext,
    evaluate_stage,
    launch,
    open_parent_run,
    run_intact,
    send_console_to_prefect,
)
from flows.tailor_flow import tailor_flow
from tailor.common.layout import WorkDir
from tailor.config.settings import TEACHER_SOURCE, PruneConfig, TailorConfig, load_config
from tailor.data.corpus import corpus_fingerprint
from tailor.models.sources import source_fingerprint, source_num_layers
from tailor.preflight import check_prune, preflight
from tailor.prune.importance import SCORED_STRATEGIES, per_layer_series
from tailor.report.compare import load_scores
from tailor.report.plots import embed_markdown, layer_scores_png
from tailor.report.sweep import BEST_RULE, best_row, render_markdown, retention_plot, sweep_rows, table
from tasks.measure import measure_speed
from tasks.models import generate_teacher_text, materialize_model, prune_model, score_layers, tokenise
from tasks.records import Evaluation, Pruned


@flow(name="llm-tailor-sweep", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False, **FAILURE_HOOKS)
def sweep_flow(profile: str = "quick", overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """Prune with every ``sweep.strategies`` x ``sweep.num_layers``; returns the table, the best row and files."""
    start = time.perf_counter()
    send_console_to_prefect()
    cfg = load_config(profile, overrides or [])
    preflight(cfg, out_dir)  # the report folder too: it is written last
    combos = combinations(cfg)
    run = open_sweep_run(cfg)  # a failure from here on is closed in MLflow by FAILURE_HOOKS
    # A local model folder's and the corpus files' content are task inputs: their cache keys.
    base = run_intact(materialize_model, cfg.model, cfg.work_dir, source_fingerprint(cfg.model)).ref
    original_eval = evaluate_stage(cfg, run.signature, "original", base)
    scored = tuple(s for s in cfg.sweep.strategies if s in SCORED_STRATEGIES)
    scores = None
    if scored:
        teacher_text = generate_teacher_text(base, cfg).tokens if TEACHER_SOURCE in cfg.distill.corpus_mix else None
        corpus = corpus_fingerprint(cfg.distill, cfg.data)
        calibration = run_intact(
            tokenise, base, cfg.distill, cfg.prune, cfg.data, cfg.work_dir, corpus, teacher_text
        ).calibration
        scores = score_layers(base, cfg.prune, scored, calibration, cfg.work_dir).scores
    # Each combination's pruning and evaluation are tasks of their own: on Dask workers with
    # runner.dask_workers / runner.dask_address.
    pruning = {
        (s, n): launch(
            cfg,
            prune_model.with_options(task_run_name=f"prune-{s}-n{n}"),
            base,
            p,
            cfg.work_dir,
            scores if s in SCORED_STRATEGIES else None,
        )
        for (s, n), p in combos.items()
    }
    pruned = {key: future.result() for key, future in pruning.items()}
    evals = {(s, n): evaluate_stage(cfg, run.signature, f"{s}-n{n}", p.ref) for (s, n), p in pruned.items()}
    results = {key: future.result() for key, future in [("original", original_eval), *evals.items()]}
    # Timed only once every evaluation is done, so nothing competes for the CPU; combinations
    # that remove the same layers are the same checkpoint and are timed once.
    profiles = measure_speed(
        {"original": base, **{p.ref.fingerprint: p.ref for p in pruned.values()}}, cfg.speed
    ).profiles
    rows = sweep_rows(
        _with_items(results["original"], profiles["original"]),
        [
            {
                "strategy": s,
                "num_layers": n,
                "removed_layers": p.removed_layers,
                **_with_items(results[(s, n)], profiles[p.ref.fingerprint]),
            }
            for (s, n), p in pruned.items()
        ],
    )
    best = best_row(rows)
    out = write_sweep_report(run, rows, best, pruned, scores, out_dir)
    run.close(time.perf_counter() - start)
    result = {
        "rows": table(rows),
        "best": {k: best[k] for k in ("strategy", "num_layers", "removed_layers", "mean_acc_retention_pct")},
        "report_md": str(out / "sweep.md"),
        "report_json": str(out / "sweep.json"),
        "parent_run_id": run.parent_id,
    }
    if cfg.sweep.distill_best:
        result["cycle"] = tailor_flow(
            profile=profile,
            overrides=[
                *(overrides or []),
                f"prune.strategy={best['strategy']}",
                f"prune.num_layers={best['num_layers']}",
                # The profile may name its own cut (quick removes layers 15-16); the sweep's best replaces it.
                "prune.indices=null",
            ],
        )
    return result


def combinations(cfg: TailorConfig) -> dict[tuple[str, int], PruneConfig]:
    """The prune settings of every (strategy, layer count), each checked before any work."""
    n_layers = source_num_layers(cfg.model)
    combos = {}
    for strategy in cfg.sweep.strategies:
        for n in cfg.sweep.num_layers:
            combos[(strategy, n)] = cfg.prune.model_copy(
                update={"strategy": strategy, "num_layers": n, "indices": None}
            )
            check_prune(combos[(strategy, n)], n_layers)
    return combos


def open_sweep_run(cfg: TailorConfig) -> RunContext:
    """The sweep's MLflow parent run and its link in Prefect."""
    return open_parent_run(
        cfg,
        "sweep",
        [],
        {"sweep": cfg.sweep.model_dump(), "eval": cfg.eval.model_dump(), "prune": cfg.prune.model_dump()},
    )


def write_sweep_report(
    run: RunContext,
    rows: list[dict],
    best: dict,
    pruned: dict[tuple[str, int], Pruned],
    scores: dict | None,
    out_dir: str | None,
) -> Path:
    """sweep.md/.json and the plots in ``out_dir`` (default: the work folder), as Prefect
    artifacts and on the MLflow parent run; returns the folder."""
    cfg = run.cfg
    out = (
        Path(out_dir).expanduser().resolve()
        if out_dir
        else WorkDir(cfg.work_dir).sweeps / get_run_context().flow_run.name
    )
    plot = retention_plot(rows, out / "sweep_retention.png")
    files = [str(plot)]
    if scores is not None:
        n = max(cfg.sweep.num_layers)
        scored = [s for s in cfg.sweep.strategies if s in SCORED_STRATEGIES]
        series = {s: per_layer_series(scores, s, n) for s in scored}
        chosen = {s: pruned[(s, n)].removed_layers for s in scored}
        files.append(str(layer_scores_png(series, chosen, out / f"layer_scores_n{n}.png")))
    markdown = render_markdown(rows, best, embed_markdown(plot, "retention vs layers removed"))
    (out / "sweep.md").write_text(markdown)
    (out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best, "best_rule": BEST_RULE}, indent=1))
    files += [str(out / "sweep.md"), str(out / "sweep.json")]
    create_table_artifact(
        key="sweep-table", table=table(rows), description=f"Pruning sweep, profile {cfg.profile}: retention vs savings"
    )
    create_markdown_artifact(key="sweep-report", markdown=markdown, description=f"Pruning sweep, profile {cfg.profile}")
    run.log(
        "sweep",
        params={"best_rule": BEST_RULE},
        metrics={
            f"{r['strategy']}.n{r['num_layers']}": {
                "mean_acc_retention_pct": r["mean_acc_retention_pct"],
                "speedup": r["speedup"],
                "params_saved_pct": r["params_saved_pct"],
            }
            for r in rows
        },
        artifacts=files,
    )
    run.client.set_tag(run.parent_id, "tailor.best", f"{best['strategy']}:{best['num_layers']}")
    return out


def _with_items(evaluation: Evaluation, profile: dict) -> dict:
    return {"metrics": evaluation.metrics, "items": load_scores(evaluation.items_file)["items"], "profile": profile}
