"""The measure-speed stage on the embedded gemma-3-270m and a copy with its last layers
removed: as it was (every model timed in every round, pruned and distilled alike) against
ours (``profile_checkpoints``: one timing per distinct architecture).

    python benchmarks/speed_stage.py [--timed-runs 7] [--max-new-tokens 50] [--remove-last 2] [--baseline]

The pruned checkpoint stands in for both pruned and distilled (they share an architecture;
their weights do not change the cost), so ours times two architectures and the baseline
three models. Prints the stage's wall and CPU seconds (loading, timing, sample
continuations; on a busy machine the wall seconds grow, the CPU seconds much less),
seconds per timed run, the speed-up with its interval over rounds, and the multiply-add
and parameter ratios. The last line is JSON.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import default_work_dir, print_summary
from transformers import AutoConfig

from tailor.config.settings import ModelConfig, SpeedConfig
from tailor.evaluate.speed import profile_checkpoints, speedup_interval, time_interleaved
from tailor.models.sources import materialize
from tailor.prune.pruning import prune_checkpoint
from tailor.store.checkpoint import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SpeedConfig()
    p.add_argument("--warmup-runs", type=int, default=defaults.warmup_runs)
    p.add_argument("--timed-runs", type=int, default=7, help="the quick profile's speed.timed_runs before this change")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--prompts", type=int, default=len(defaults.prompts), help="the first N of the book's prompts")
    p.add_argument("--remove-last", type=int, default=2, help="decoder layers removed (the quick profile's 2)")
    p.add_argument("--baseline", action="store_true", help="also time the stage as it was (all three models)")
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()

    cfg = SpeedConfig(
        prompts=defaults.prompts[: args.prompts],
        max_new_tokens=args.max_new_tokens,
        warmup_runs=args.warmup_runs,
        timed_runs=args.timed_runs,
    )
    base = materialize(ModelConfig(source="embedded"), args.work_dir)
    n = int(AutoConfig.from_pretrained(base.path).num_hidden_layers)
    pruned, _, _ = prune_checkpoint(base, list(range(n - args.remove_last, n)), args.work_dir)
    refs = {"original": base, "pruned": pruned, "distilled": pruned}
    print(
        f"model: embedded gemma-3-270m, float32, {torch.get_num_threads()} threads; {n} vs {n - args.remove_last} "
        f"layers; {len(cfg.prompts)} prompts x {cfg.max_new_tokens} new tokens, warm-up {cfg.warmup_runs}, "
        f"{cfg.timed_runs} timed rounds"
    )

    summary = {
        "prompts": len(cfg.prompts),
        "max_new_tokens": cfg.max_new_tokens,
        "warmup_runs": cfg.warmup_runs,
        "timed_runs": cfg.timed_runs,
        "layers": [n, n - args.remove_last],
        "threads": torch.get_num_threads(),
    }
    start, cpu = time.perf_counter(), time.process_time()
    profiles = profile_checkpoints(refs, cfg)
    summary["ours_stage_s"], summary["ours_stage_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
    orig, pr = profiles["original"], profiles["pruned"]
    s = speedup_interval(orig["run_times_s"], pr["run_times_s"])
    summary |= {
        "ours_run_s": {k: profiles[k]["gen_time_mean_s"] for k in ("original", "pruned")},
        "ours_speedup": s["median"],
        "ours_speedup_ci95": s["ci95"],
        "distilled_timed_as": profiles["distilled"]["timed_as"],
        "macs_ratio": orig["macs_per_token"] / pr["macs_per_token"],
        "params_ratio": orig["params"] / pr["params"],
    }
    print(
        f"ours: stage {summary['ours_stage_s']:.1f} s ({summary['ours_stage_cpu_s']:.1f} CPU s); per run original "
        f"{orig['gen_time_mean_s']:.2f} s, pruned "
        f"{pr['gen_time_mean_s']:.2f} s (distilled timed as {summary['distilled_timed_as']}); speed-up "
        f"{s['median']:.3f}x [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]; multiply-adds ratio "
        f"{summary['macs_ratio']:.3f}, parameter ratio {summary['params_ratio']:.3f}"
    )

    if args.baseline:
        start, cpu = time.perf_counter(), time.process_time()
        models = {name: load_model(ref) for name, ref in refs.items()}
        timing = time_interleaved(models, cfg)
        summary["baseline_stage_s"] = time.perf_counter() - start
        summary["baseline_stage_cpu_s"] = time.process_time() - cpu
        summary["baseline_run_s"] = {k: t["gen_time_mean_s"] for k, t in timing.items()}
        tie = speedup_interval(timing["pruned"]["run_times_s"], timing["distilled"]["run_times_s"])
        summary["baseline_distilled_vs_pruned"] = tie["median"]
        summary["baseline_distilled_vs_pruned_ci95"] = tie["ci95"]
        print(
            f"baseline (no sample continuations): stage {summary['baseline_stage_s']:.1f} s "
            f"({summary['baseline_stage_cpu_s']:.1f} CPU s); per run "
            + ", ".join(f"{k} {v:.2f} s" for k, v in summary["baseline_run_s"].items())
            + f"; distilled vs pruned {tie['median']:.3f}x [{tie['ci95'][0]:.3f}, {tie['ci95'][1]:.3f}]"
        )
    print_summary(summary)


if __name__ == "__main__":
    main()
