"""The size-quality frontier: how many layers can go, and what each size keeps and buys once healed.

    materialize ─ tokenise ─┬─ prune(cut) ─ heal-cut(cut, short) ─┐ per size: the cut with the
                            │      (every candidate cut, at once)  ├ lowest held-out perplexity
                            │                                      │ after the short heal
                            └─ heal-cut(chosen cut, the recipe) ───┴─ evaluate(original + every size)
                                   (every size, at once)             ─ measure-speed ─ frontier report

Candidates and sizes are submitted to the flow's task runner together (a local Dask cluster
by default, or the cluster at ``runner.dask_address``); each is a cached task of its own, so a
re-run or a new size costs only what changed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.task_runners import ThreadPoolTaskRunner

from flows.stages import FAILURE_HOOKS, RunContext, open_parent_run, run_intact, send_console_to_prefect
from tailor.common.console import LOGGER
from tailor.common.layout import WorkDir
from tailor.config.settings import TEACHER_SOURCE, ConfigError, PruneConfig, TailorConfig, load_config
from tailor.data.corpus import corpus_fingerprint
from tailor.models.sources import source_fingerprint, source_num_layers
from tailor.preflight import preflight
from tailor.prune.cuts import contiguous_cuts
from tailor.report.compare import load_scores
from tailor.report.frontier import frontier_png, frontier_rows, largest_within, pooled_accuracy, render_markdown
from tailor.report.plots import embed_markdown
from tasks.frontier import heal_cut
from tasks.measure import evaluate_models, measure_speed
from tasks.models import materialize_model, prune_model, tokenise

STAGES = ["materialize", "tokenise", "prune", "screen-cuts", "heal", "evaluate", "measure-speed", "report"]


@flow(name="llm-tailor-frontier", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=False, **FAILURE_HOOKS)
def frontier_flow(profile: str = "heal", overrides: list[str] | None = None, out_dir: str | None = None) -> dict:
    """For each ``frontier.sizes``: the cut that heals best, healed with the profile's recipe, and
    every size against the original; returns the table, the largest size within the margin and files."""
    start = time.perf_counter()
    send_console_to_prefect()
    cfg = load_config(profile, overrides or [])
    preflight(cfg, out_dir)
    cuts = candidate_cuts(cfg)
    run = open_frontier_run(cfg)
    with run.stage("materialize") as stage:
        base = run_intact(materialize_model, cfg.model, cfg.work_dir, source_fingerprint(cfg.model)).ref
        stage.detail = base.path
    with run.stage("tokenise"):
        tokens = run_intact(
            tokenise, base, cfg.distill, cfg.prune, cfg.data, cfg.work_dir, corpus_fingerprint(cfg.distill, cfg.data)
        )
    with run.stage("prune") as stage:
        futures = {
            tuple(cut): prune_model.with_options(task_run_name=f"prune-{_name(cut)}").submit(
                base, PruneConfig(strategy="indices", indices=cut), cfg.work_dir
            )
            for size_cuts in cuts.values()
            for cut in size_cuts
        }
        pruned = {cut: future.result() for cut, future in futures.items()}
        stage.detail = f"{len(pruned)} candidate cuts"
    screen = cfg.distill.model_copy(
        update={"num_samples": min(cfg.frontier.screen_samples, cfg.distill.num_samples), "epochs": 1, "then": []}
    )
    with run.stage("screen-cuts") as stage:
        futures = {
            cut: heal_cut.with_options(task_run_name=f"screen-{_name(cut)}").submit(
                base, pruned[cut].ref, screen, tokens.train, tokens.heldout, cfg.work_dir
            )
            for cut in pruned
        }
        screened = {cut: future.result() for cut, future in futures.items()}
        chosen = {
            size: min(map(tuple, size_cuts), key=lambda c: screened[c].heldout_ppl) for size, size_cuts in cuts.items()
        }
        stage.detail = "; ".join(f"{size} layers: {_name(cut)}" for size, cut in chosen.items())
    with run.stage("heal") as stage:
        futures = {
            size: heal_cut.with_options(task_run_name=f"heal-{_name(cut)}").submit(
                base, pruned[cut].ref, cfg.distill, tokens.train, tokens.heldout, cfg.work_dir
            )
            for size, cut in chosen.items()
        }
        healed = {size: future.result() for size, future in futures.items()}
        stage.detail = "; ".join(f"{size} layers: held-out ppl {h.heldout_ppl:.2f}" for size, h in healed.items())
    refs = {"original": base, **{f"cut-{size}": h.ref for size, h in healed.items()}}
    with run.stage("evaluate"):
        evaluations = evaluate_models(refs, cfg.eval, cfg.data, cfg.work_dir, None, run.signature)
    with run.stage("measure-speed"):
        profiles = measure_speed(refs, cfg.speed).profiles
    with run.stage("report") as stage:

        def scored(name: str) -> dict:
            e = evaluations.models[name]
            return {"metrics": e.metrics, "items": load_scores(e.items_file)["items"], "profile": profiles[name]}

        original = scored("original")
        rows = frontier_rows(
            original,
            [
                {
                    **scored(f"cut-{size}"),
                    "size": size,
                    "removed_layers": list(chosen[size]),
                    "heldout_ppl": h.heldout_ppl,
                    "candidates": [
                        {"removed_layers": list(c), "heldout_ppl": screened[tuple(c)].heldout_ppl} for c in cuts[size]
                    ],
                }
                for size, h in healed.items()
            ],
            cfg.frontier.max_drop,
        )
        out = write_frontier_report(run, rows, original, out_dir)
        best = largest_within(rows)
        stage.detail = f"largest cut within the margin: {best['size']} layers" if best else "no size within the margin"
    run.close(time.perf_counter() - start)
    return {
        "rows": [_summary(r) for r in rows],
        "largest_within_margin": best["size"] if best else None,
        "report_md": str(out / "frontier.md"),
        "report_json": str(out / "frontier.json"),
        "parent_run_id": run.parent_id,
    }


def candidate_cuts(cfg: TailorConfig) -> dict[int, list[list[int]]]:
    """Every size's candidate cuts, checked before any work."""
    if cfg.distill.then:
        raise ConfigError("frontier heals each cut with distill's first phase only; set distill.then=[]")
    if TEACHER_SOURCE in cfg.distill.corpus_mix:
        raise ConfigError(
            f"frontier does not generate the teacher's text; drop {TEACHER_SOURCE!r} from distill.corpus_mix"
        )
    layers = source_num_layers(cfg.model)
    return {size: contiguous_cuts(layers, size, cfg.frontier.candidates) for size in cfg.frontier.sizes}


def open_frontier_run(cfg: TailorConfig) -> RunContext:
    """The frontier's MLflow parent run, its link in Prefect, its stage lines."""
    run = open_parent_run(cfg, "frontier", STAGES, cfg.settings_record())
    LOGGER.info(f"frontier of profile {cfg.profile}: sizes {list(cfg.frontier.sizes)}, MLflow run {run.parent_id}")
    return run


def write_frontier_report(run: RunContext, rows: list[dict], original: dict, out_dir: str | None) -> Path:
    """frontier.md/.json and the figure in ``out_dir`` (default: the work folder), as Prefect
    artifacts and on the MLflow parent run; returns the folder."""
    cfg = run.cfg
    out = (
        Path(out_dir).expanduser().resolve()
        if out_dir
        else WorkDir(cfg.work_dir).frontiers / get_run_context().flow_run.name
    )
    out.mkdir(parents=True, exist_ok=True)
    plot = frontier_png(rows, pooled_accuracy(original), cfg.frontier.max_drop, out / "frontier.png")
    markdown = render_markdown(rows, original["profile"], cfg.frontier.max_drop, embed_markdown(plot, "frontier"))
    (out / "frontier.md").write_text(markdown)
    best = largest_within(rows)
    (out / "frontier.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "max_drop": cfg.frontier.max_drop,
                "largest_within_margin": best["size"] if best else None,
                "original": {k: original["profile"][k] for k in ("params", "macs_per_token")},
            },
            indent=1,
        )
    )
    create_table_artifact(
        key="frontier-table", table=[_summary(r) for r in rows], description=f"Frontier, profile {cfg.profile}"
    )
    create_markdown_artifact(key="frontier-report", markdown=markdown, description=f"Frontier, profile {cfg.profile}")
    run.log(
        "frontier",
        params={"max_drop": cfg.frontier.max_drop, "sizes": list(cfg.frontier.sizes)},
        metrics={
            f"n{r['size']}": {
                "mean_acc_retention_pct": r["mean_acc_retention_pct"],
                "pooled_delta": r["acc_delta_pooled"]["delta"],
                "speedup": r["speedup"],
                "params": r["params"],
            }
            for r in rows
        },
        artifacts=[str(out / name) for name in ("frontier.md", "frontier.json", "frontier.png")],
    )
    return out


def _summary(row: dict) -> dict:
    """A flat line of the table: what a person reads first."""
    pooled = row["acc_delta_pooled"]
    return {
        "layers removed": row["size"],
        "which": _name(row["removed_layers"]),
        "params": row["params"],
        "speed-up": round(row["speedup"], 3),
        "pooled Δ": round(pooled["delta"], 4),
        "95% CI": f"[{pooled['ci_low']:+.4f}, {pooled['ci_high']:+.4f}]",
        "within margin": row["within_margin"],
    }


def _name(cut) -> str:
    return "-".join(map(str, cut))
