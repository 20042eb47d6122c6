"""A hidden-state healing step from the live teacher against the same step from the activation cache,
on the embedded gemma-3-270m with the heal profile's recipe, side by side in one process.

    python benchmarks/activation_cache.py [--samples 128] [--cut 13-16] [--profile heal]

Both runs train the profile's student (its cut, its last layers, its objective and optimiser)
on the same first ``--samples`` training windows for one epoch from the same weights: ``live``
runs the teacher's forward every step (the shared trunk once for both models, then the teacher's
remaining layers), ``cached`` reads the trunk's output and the teacher's targets from disk and
runs only the student's trained layers. Steps are timed after the first (one-off allocations);
the cache's one-off cost (the teacher over every sample once) is printed beside it. The trained
weights of the two runs are compared bit for bit. The last line is JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, default_work_dir, parse_cut, print_summary

from tailor.common.layout import WorkDir
from tailor.config.settings import DataConfig, ModelConfig, PruneConfig, load_config
from tailor.data.tokenised import tokenise_corpus
from tailor.distill.activation_cache import ActivationCache, write_activation_cache
from tailor.distill.trainer import Distiller
from tailor.models.precision import load_teacher
from tailor.models.sources import materialize, source_num_layers
from tailor.prune.pruning import prune_checkpoint
from tailor.store.checkpoint import load_model


def timed_fit(teacher, student, samples, cfg, activations=None) -> tuple[dict, list[float]]:
    stamps = [time.perf_counter()]
    record = Distiller(
        teacher, student, samples, cfg, activations=activations, on_step=lambda s, v: stamps.append(time.perf_counter())
    ).fit()
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]
    return record, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="heal", help="the profile whose cut and distillation recipe are timed")
    p.add_argument("--samples", type=int, default=128, help="training windows (one epoch over them)")
    p.add_argument("--cut", help="layers removed instead of the profile's, e.g. 13-16")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()
    work = Path(args.work_dir)
    profile = load_config(args.profile)
    cfg = profile.distill.model_copy(update={"num_samples": args.samples, "epochs": 1, "heldout_every": 0})
    base = materialize(ModelConfig(source="embedded"), str(work))
    layers = source_num_layers(ModelConfig(source="embedded"))
    removed = parse_cut(args.cut, layers) if args.cut else list(profile.prune.indices)
    pruned = prune_checkpoint(base, removed, str(work))[0]
    tokens = tokenise_corpus(base, cfg, PruneConfig(), DataConfig(data_dir=args.data_dir), str(work))
    samples = {k: v[: cfg.num_samples] for k, v in tokens["train"].samples().items()}
    real_tokens = int(samples["attention_mask"].sum())

    started = time.perf_counter()
    ref = write_activation_cache(base, pruned, cfg, tokens["train"], WorkDir(work).activations, WorkDir(work).probes)
    cache_seconds = time.perf_counter() - started
    cache = ActivationCache(ref, samples)
    cached_student = load_model(pruned)[0]
    cached, cached_steps = timed_fit(None, cached_student, samples, cfg, activations=cache)
    cache.close()

    teacher = load_teacher(base, cfg.teacher_dtype, samples["input_ids"], probe_dir=WorkDir(work).probes)
    live_student = load_model(pruned)[0]
    live, live_steps = timed_fit(teacher, live_student, samples, cfg)

    a, b = live_student.state_dict(), cached_student.state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    live_s, cached_s = sum(live_steps) / len(live_steps), sum(cached_steps) / len(cached_steps)
    tokens_per_step = real_tokens / live.optimizer_steps
    print(
        f"removed layers {removed}; {cfg.num_samples} windows, {real_tokens:,} real tokens, "
        f"{live.optimizer_steps} steps"
    )
    print(f"shared trunk: {live.shared_trunk_layers} layers; objective {live.loss}")
    print(f"live teacher : {live_s:.2f} s/step ({tokens_per_step / live_s:.0f} tokens/s)")
    print(f"cached       : {cached_s:.2f} s/step ({tokens_per_step / cached_s:.0f} tokens/s)")
    print(f"step time cached / live: {cached_s / live_s:.2f} ({live_s / cached_s:.2f}x faster)")
    steps = live.optimizer_steps
    epochs_for_one = (live_s * steps - cache_seconds) / (cached_s * steps)
    print(
        f"cache written once in {cache_seconds:.1f} s ({cache_seconds / steps:.2f} s per step's samples); "
        f"the time of one live epoch buys {epochs_for_one:.2f} cached epochs (cache included)"
    )
    print(f"trained weights equal to the bit: {same}; losses equal: {live.losses == cached.losses}")
    print_summary(
        {
            "removed": removed,
            "samples": cfg.num_samples,
            "steps": live.optimizer_steps,
            "live_s_per_step": live_s,
            "cached_s_per_step": cached_s,
            "cached_over_live": cached_s / live_s,
            "cache_write_s": cache_seconds,
            "weights_equal": same,
            "losses_equal": live.losses == cached.losses,
        }
    )


if __name__ == "__main__":
    main()
