"""Which layers to remove: the embedded gemma-3-270m with several cuts of the same size, each
judged against the original and against the last-N cut on the same documents.

    python benchmarks/cuts.py [--limit 1000] [--cuts 14-17 13-16 8-11 2,8,9,16] [--data-dir ../shared/data]

A cut is a range ``a-b`` (both ends removed) or a comma-separated list of layer indices.
All models are scored in one joint pass (the layers a cut leaves before its first removed
layer run once, shared with the original), and answers stored by earlier runs are reused.
Per cut: the per-task and pooled accuracy change against the original with paired 95%
intervals, the mean accuracy retention, LAMBADA perplexity, and, against the first cut
named (the reference), the change and the share of the reference's damage the cut avoids.
First, the cuts the scored strategies would choose (``angular``, ``block_influence``) from
calibration windows of the distillation corpus. The last line is JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import SHARED_DATA, default_work_dir, parse_cut, print_summary

from tailor.config.settings import REFERENCE_TASKS, DataConfig, DistillConfig, EvalConfig, ModelConfig, PruneConfig
from tailor.data.corpus import training_samples
from tailor.evaluate.joint import evaluate_checkpoints
from tailor.models.sources import materialize, source_num_layers
from tailor.prune.importance import choose_layers, layer_scores
from tailor.prune.pruning import prune_checkpoint
from tailor.report.compare import mean_acc_retention
from tailor.report.healing import healing_summary
from tailor.store.checkpoint import load_model

CALIBRATION = DistillConfig(
    corpus_mix={"corpus/tinystories_sample.jsonl": 1, "corpus/wikipedia_sample.jsonl": 3},
    seq_len=128,
    num_samples=128,
    windows_per_doc=2,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000, help="documents per task")
    p.add_argument("--cuts", nargs="+", default=["14-17", "13-16", "8-11", "2,8,9,16"])
    p.add_argument("--tasks", nargs="+", default=list(REFERENCE_TASKS))
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()
    work = str(Path(args.work_dir))
    data = DataConfig(data_dir=args.data_dir)
    eval_cfg = EvalConfig(tasks=args.tasks, limit=args.limit, batch_size=32)
    base = materialize(ModelConfig(source="embedded"), work)
    num_layers = source_num_layers(ModelConfig(source="embedded"))
    cuts = {c: parse_cut(c, num_layers) for c in args.cuts}
    print_scored_choices(base, data, {len(layers) for layers in cuts.values()})
    pruned = {c: prune_checkpoint(base, layers, work)[0] for c, layers in cuts.items()}

    start = time.perf_counter()
    joint = evaluate_checkpoints({"original": base, **pruned}, eval_cfg, data, work)[0]
    print(f"evaluated in {time.perf_counter() - start:.0f} s; shared layers {joint.trunk_depths}", flush=True)
    results = joint.results
    reference = args.cuts[0]

    def change(r: dict) -> str:
        """The recovery's change against its "pruned" model, with its interval."""
        lo, hi = r["delta_ci95"]
        return f"{r['delta_vs_pruned']:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    def cost(r: dict) -> str:
        """The recovery's "damage" (original minus "pruned") as a change against the original."""
        lo, hi = r["damage_ci95"]
        return f"{-r['damage']:+.3f} [{-hi:+.3f}, {-lo:+.3f}]"

    rows = {}
    header = ["cut", *[f"{t} Δacc vs original" for t in args.tasks], "pooled vs original", "retention"]
    header += ["lambada ppl", f"pooled vs {reference}", f"share of {reference}'s damage avoided"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cut in args.cuts:
        # Against the original: the original plays "original" and "pruned" is this cut, so the
        # "damage" fields are the cut's own cost.
        own = healing_summary({"original": results["original"], "pruned": results[cut], "distilled": results[cut]})
        versus = healing_summary(
            {"original": results["original"], "pruned": results[reference], "distilled": results[cut]}
        )
        pooled = versus["pooled"]
        share = "cannot tell" if pooled["recovered_share"] is None else f"{pooled['recovered_share']:.0%}"
        if pooled["recovered_share_ci95"]:
            share += " [{:.0%}, {:.0%}]".format(*pooled["recovered_share_ci95"])
        retention = mean_acc_retention(results["original"]["metrics"], results[cut]["metrics"])
        rows[cut] = {
            "layers": cuts[cut],
            "per_task_cost": {t: r["damage"] for t, r in own["per_task"].items()},
            "pooled_cost": own["pooled"]["damage"],
            "pooled_cost_ci95": own["pooled"]["damage_ci95"],
            "retention_pct": retention,
            "lambada_ppl": own["perplexity"]["pruned"] if own["perplexity"] else None,
            "vs_reference": pooled["delta_vs_pruned"],
            "vs_reference_ci95": pooled["delta_ci95"],
            "share_of_reference_damage_avoided": pooled["recovered_share"],
        }
        cells = [
            cut,
            *[cost(r) for r in own["per_task"].values()],
            cost(own["pooled"]),
            f"{retention:.1f}%" if retention is not None else "n/a",
            f"{rows[cut]['lambada_ppl']:.1f}" if rows[cut]["lambada_ppl"] else "n/a",
            "" if cut == reference else change(pooled),
            "" if cut == reference else share,
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    print_summary({"limit": args.limit, "reference": reference, "cuts": rows})


def print_scored_choices(base, data: DataConfig, sizes: set[int]) -> None:
    """What the scored strategies would remove, from 128 calibration windows (no evaluation data)."""
    model, tokenizer = load_model(base)
    samples = training_samples(tokenizer, CALIBRATION, data)
    scores = layer_scores(model, samples, 16, ("block_influence", "angular"))
    for n in sorted(sizes):
        for strategy in ("angular", "block_influence"):
            chosen = choose_layers(PruneConfig(strategy=strategy, num_layers=n), scores["num_layers"], scores)
            print(f"{strategy} removes {chosen} of {scores['num_layers']} layers", flush=True)
        distances = {i: scores["angular"][i][i + n] for i in range(scores["num_layers"] - n + 1)}
        closest = sorted(distances, key=distances.get)[:3]
        print(
            f"  angular distance of the closest {n}-blocks: "
            + ", ".join(f"{i}-{i + n - 1} {distances[i]:.3f}" for i in closest)
        )


if __name__ == "__main__":
    main()
