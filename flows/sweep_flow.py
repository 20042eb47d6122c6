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
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import evaluate_stage, run_link
from flows.tailor_flow import tailor_flow
from tailor import tracking
from tailor.compare import load_scores
from tailor.config import load_config
from tailor.importance import SCORED_STRATEGIES, per_layer_series
from tailor.plots import embed_markdown, layer_scores_png
from tailor.preflight import check_prune, preflight
from tailor.sources import source_num_layers
from tailor.sweep import BEST_RULE, best_row, render_markdown, retention_plot, sweep_rows, table
from tasks.measure import measure_speed
from tasks.models import materialize_model, prune_model, score_layers
from tasks.tracking import log_stage


@flow(name="llm-tailor-sweep", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False)
def sweep_flow(profile: str = "quick", overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """Prune with every ``sweep.strategies`` x ``sweep.num_layers``; returns the table, the best row and files."""
    start = time.perf_counter()
    cfg = load_config(profile, overrides or [])
    preflight(cfg)
    n_layers = source_num_layers(cfg.model)
    combos = [(s, n) for s in cfg.sweep.strategies for n in cfg.sweep.num_layers]
    prune_cfgs = {}
    for strategy, n in combos:
        prune_cfgs[(strategy, n)] = cfg.prune.model_copy(update={"strategy": strategy, "num_layers": n,
                                                                  "indices": None})
        check_prune(prune_cfgs[(strategy, n)], n_layers)

    uri = cfg.tracking_uri
    flow_run_name = get_run_context().flow_run.name
    client, exp_id, parent = tracking.start_parent_run(
        uri, cfg.tracking.experiment, cfg.work_dir, f"sweep-{cfg.profile}-{flow_run_name}",
        tags={"tailor.profile": cfg.profile, "tailor.kind": "sweep", "prefect.flow_run": flow_run_name})
    tracking.log_params(client, parent, {"sweep": cfg.sweep.model_dump(), "eval": cfg.eval.model_dump(),
                                         "prune": cfg.prune.model_dump()})
    create_link_artifact(key="mlflow-sweep-run", link=run_link(uri, exp_id, parent),
                         description="MLflow parent run of this sweep")
    try:
        base = materialize_model(cfg.model, cfg.work_dir)["ref"]
        original_eval = evaluate_stage(cfg, "original", base)
        scored = tuple(s for s in cfg.sweep.strategies if s in SCORED_STRATEGIES)
        scores = score_layers(base, cfg.prune, scored, cfg.distill, cfg.data, cfg.work_dir)["scores"] \
            if scored else None
        pruned, evals = {}, {}
        for strategy, n in combos:
            pruned[(strategy, n)] = prune_model(base, prune_cfgs[(strategy, n)], cfg.work_dir,
                                                scores if strategy in SCORED_STRATEGIES else None)
            evals[(strategy, n)] = evaluate_stage(cfg, f"{strategy}-n{n}", pruned[(strategy, n)]["ref"])
        results = {key: future.result() for key, future in [("original", original_eval), *evals.items()]}
        # Timed only once every evaluation is done, so nothing competes for the CPU; combinations
        # that remove the same layers are the same checkpoint and are timed once.
        refs = {"original": base, **{p["ref"].fingerprint: p["ref"] for p in pruned.values()}}
        profiles = measure_speed(refs, cfg.speed)
        original = _with_items(results["original"], profiles["original"])
        rows = sweep_rows(original, [
            {"strategy": s, "num_layers": n, "removed_layers": pruned[(s, n)]["removed_layers"],
             **_with_items(results[(s, n)], profiles[pruned[(s, n)]["ref"].fingerprint])}
            for s, n in combos])
        best = best_row(rows)

        out = Path(out_dir).expanduser().resolve() if out_dir else Path(cfg.work_dir) / "sweeps" / flow_run_name
        plot = retention_plot(rows, out / "sweep_retention.png")
        files = [str(plot)]
        if scores is not None:
            n = max(cfg.sweep.num_layers)
            series = {s: per_layer_series(scores, s, n) for s in scored}
            chosen = {s: pruned[(s, n)]["removed_layers"] for s in scored}
            files.append(str(layer_scores_png(series, chosen, out / f"layer_scores_n{n}.png")))
        markdown = render_markdown(rows, best, embed_markdown(plot, "retention vs layers removed"))
        (out / "sweep.md").write_text(markdown)
        (out / "sweep.json").write_text(json.dumps({"rows": rows, "best": best, "best_rule": BEST_RULE}, indent=1))
        files += [str(out / "sweep.md"), str(out / "sweep.json")]
        create_table_artifact(key="sweep-table", table=table(rows),
                              description=f"Pruning sweep, profile {cfg.profile}: retention vs savings")
        create_markdown_artifact(key="sweep-report", markdown=markdown,
                                 description=f"Pruning sweep, profile {cfg.profile}")
        log_stage(uri, exp_id, parent, "sweep", params={"best_rule": BEST_RULE},
                  metrics={f"{r['strategy']}.n{r['num_layers']}": {
                      "mean_acc_retention_pct": r["mean_acc_retention_pct"], "speedup": r["speedup"],
                      "params_saved_pct": r["params_saved_pct"]} for r in rows}, artifacts=files)
        client.set_tag(parent, "tailor.best", f"{best['strategy']}:{best['num_layers']}")
    except Exception:
        tracking.end_run(client, parent, failed=True)
        raise
    tracking.log_metrics(client, parent, {"flow_seconds": time.perf_counter() - start})
    tracking.end_run(client, parent)
    result = {"rows": table(rows), "best": {k: best[k] for k in ("strategy", "num_layers", "removed_layers",
                                                                 "mean_acc_retention_pct")},
              "report_md": str(out / "sweep.md"), "report_json": str(out / "sweep.json"), "parent_run_id": parent}
    if cfg.sweep.distill_best:
        result["cycle"] = tailor_flow(profile=profile, overrides=[
            *(overrides or []), f"prune.strategy={best['strategy']}", f"prune.num_layers={best['num_layers']}"])
    return result


def _with_items(evaluation: dict, profile: dict) -> dict:
    return {"metrics": evaluation["metrics"], "items": load_scores(evaluation["items_file"])["items"], "profile": profile}
