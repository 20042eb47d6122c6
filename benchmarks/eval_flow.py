"""The flow's evaluation of three models: one after another against together (shared layers run
once), side by side in one process on the embedded gemma-3-270m, float32, the same tasks and limit.

    python benchmarks/eval_flow.py [--limit 50] [--remove-last 4] [--train-last 4]

The three models are shaped like the flow's: the original, the original without its last
``--remove-last`` layers, and a "distilled" model that is the pruned one with its last
``--train-last`` layers changed (a small random change stands in for training, so it shares
exactly the layers a model distilled with ``distill.train_last_layers`` shares; 0 changes every
layer and the embedding, as full-model distillation does). Its accuracy means nothing here;
what is measured is the cost of the evaluation and whether the answers are the same.

Prints each way's seconds, the ratio, the layers each model shared with the original, the max
|Δ loglikelihood| over every request of every model (0 means bit for bit) and the number of
requests whose greedy flag or document whose accuracy differs. The last line is JSON.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, default_work_dir, print_summary

from tailor.config.settings import REFERENCE_TASKS, DataConfig, EvalConfig, ModelConfig
from tailor.evaluate.harness import evaluate_model
from tailor.evaluate.joint import evaluate_together
from tailor.models.sources import materialize
from tailor.prune.pruning import prune_layers
from tailor.prune.trunk import decoder_layers
from tailor.store.checkpoint import load_model


def three_models(ref, remove_last: int, train_last: int) -> tuple[dict, object]:
    original, tokenizer = load_model(ref)
    pruned, _ = load_model(ref)
    n = len(decoder_layers(pruned))
    prune_layers(pruned, list(range(n - remove_last, n)))
    distilled, _ = load_model(ref)
    prune_layers(distilled, list(range(n - remove_last, n)))
    changed = decoder_layers(distilled)[-train_last:] if train_last else [distilled]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in changed:
            for p in module.parameters():
                p.add_(1e-3 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return {"original": original, "pruned": pruned, "distilled": distilled}, tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=50, help="documents per task")
    p.add_argument("--remove-last", type=int, default=4)
    p.add_argument("--train-last", type=int, default=4, help="layers the stand-in distillation changed (0: all)")
    p.add_argument("--tasks", nargs="+", default=list(REFERENCE_TASKS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()
    cfg = EvalConfig(tasks=tuple(args.tasks), limit=args.limit, batch_size=args.batch_size)
    data = DataConfig(data_dir=args.data_dir)
    ref = materialize(ModelConfig(source="embedded"), args.work_dir)
    models, tokenizer = three_models(ref, args.remove_last, args.train_last)

    start = time.perf_counter()
    alone = {name: evaluate_model(model, tokenizer, cfg, data) for name, model in models.items()}
    separate_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as answers:
        start = time.perf_counter()
        joint = evaluate_together(
            {name: (name, lambda m=model: (m, tokenizer)) for name, model in models.items()}, cfg, data, Path(answers)
        )
        together_s = time.perf_counter() - start

    worst, greedy_flips, acc_flips, requests = 0.0, 0, 0, 0
    for name in models:
        for task in cfg.tasks:
            ours, theirs = joint.results[name]["requests"][task], alone[name]["requests"][task]
            for doc_a, doc_b in zip(ours, theirs, strict=True):
                for (ll_a, g_a), (ll_b, g_b) in zip(doc_a, doc_b, strict=True):
                    worst = max(worst, abs(ll_a - ll_b))
                    greedy_flips += g_a != g_b
                    requests += 1
            items_a, items_b = joint.results[name]["items"][task], alone[name]["items"][task]
            acc_flips += sum(items_a[d] != items_b[d] for d in items_b)
    summary = {
        "limit": args.limit,
        "tasks": list(cfg.tasks),
        "remove_last": args.remove_last,
        "train_last": args.train_last,
        "threads": torch.get_num_threads(),
        "separate_s": round(separate_s, 1),
        "together_s": round(together_s, 1),
        "speedup": round(separate_s / together_s, 2),
        "shared_layers": joint.trunk_depths,
        "requests_per_model": requests // len(models),
        "max_abs_loglik_diff": worst,
        "greedy_disagreements": greedy_flips,
        "document_disagreements": acc_flips,
    }
    print(
        f"three models, {args.limit} documents per task: separately {separate_s:.0f} s, together {together_s:.0f} s "
        f"({summary['speedup']:.2f}x); layers shared with the original {joint.trunk_depths}"
    )
    print(f"max |Δ loglik| {worst:g}; greedy disagreements {greedy_flips}; document disagreements {acc_flips}")
    print_summary(summary)


if __name__ == "__main__":
    main()
