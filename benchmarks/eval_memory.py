"""Evaluation memory: the fast evaluator scoring every scored position of a batch in one
output-head pass (the baseline) against bounded chunks (ours, ``score_chunk_tokens``),
side by side in one process on the embedded gemma-3-270m, float32, the same requests.

    python benchmarks/eval_memory.py [--limit 64] [--batch-size 32] [--data-dir ../shared/data]

Each contender's peak resident memory above what the process held before it ran is
sampled every few milliseconds. Ours runs first, so the baseline may reuse memory the
allocator kept: the ratio printed understates the saving if anything. Also prints the max
per-request log-likelihood difference and whether greedy flags are identical. The last
line is JSON.
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch
from _common import SHARED_DATA, default_work_dir, print_summary
from eval_throughput import build_requests, score

from tailor.config.settings import DataConfig, ModelConfig
from tailor.evaluate.fast_lm import FastHFLM
from tailor.models.sources import materialize
from tailor.store.checkpoint import load_model


class PeakRSS:
    """Highest resident set size of this process while the block runs, sampled in a thread."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self._stop = every_s, 0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.before = psutil.Process().memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(self.every_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added_gib(self) -> float:
        return (self.peak - self.before) / 2**30


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=64, help="documents per task")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["hellaswag", "lambada_openai"],
        help="hellaswag's long continuations make the most scored positions per batch",
    )
    p.add_argument("--batch-size", type=int, default=32, help="the shipped profiles' eval.batch_size")
    p.add_argument("--chunk", type=int, default=FastHFLM.score_chunk_tokens, help="ours: scored positions per pass")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model(materialize(ModelConfig(source="embedded"), args.work_dir))
    instances = build_requests(tuple(args.tasks), DataConfig(data_dir=args.data_dir), args.limit)
    n_requests = sum(len(v) for v in instances.values())
    print(
        f"model: embedded gemma-3-270m, float32, {torch.get_num_threads()} threads; tasks {args.tasks}, "
        f"limit {args.limit}: {n_requests} requests, batch size {args.batch_size}"
    )

    runs = {}
    for name, chunk in (("ours", args.chunk), ("baseline", 1 << 30)):
        lm = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
        lm.score_chunk_tokens = chunk
        with PeakRSS() as peak:
            seconds, answers = score(lm, instances)
        runs[name] = {"added_gib": peak.added_gib, "seconds": seconds, "answers": answers}
        print(f"{name:>9}: peak +{peak.added_gib:.2f} GiB above {peak.before / 2**30:.2f} GiB, {seconds:.1f} s")

    max_diff, greedy_equal = 0.0, True
    for task in instances:
        for (la, ga), (lb, gb) in zip(runs["ours"]["answers"][task], runs["baseline"]["answers"][task]):
            max_diff = max(max_diff, abs(la - lb))
            greedy_equal &= ga == gb
    ratio = runs["baseline"]["added_gib"] / max(runs["ours"]["added_gib"], 1e-9)
    print(
        f"peak memory added, baseline / ours: {ratio:.1f}x; time ours / baseline: "
        f"{runs['ours']['seconds'] / runs['baseline']['seconds']:.2f}"
    )
    print(f"max |loglik(ours) - loglik(baseline)|: {max_diff:.2e}; greedy flags identical: {greedy_equal}")
    print_summary(
        {
            "limit": args.limit,
            "tasks": args.tasks,
            "batch_size": args.batch_size,
            "chunk": args.chunk,
            "requests": n_requests,
            "ours_added_gib": runs["ours"]["added_gib"],
            "baseline_added_gib": runs["baseline"]["added_gib"],
            "memory_ratio": ratio,
            "time_ratio": runs["ours"]["seconds"] / runs["baseline"]["seconds"],
            "max_abs_loglik_diff": max_diff,
            "greedy_flags_identical": greedy_equal,
        }
    )


if __name__ == "__main__":
    main()
