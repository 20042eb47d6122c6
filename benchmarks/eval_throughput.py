"""Evaluation throughput: lm-eval's HFLM (batch 1, the book's setting, and its best batch
size) against llm-tailor's FastHFLM, side by side in one process on the embedded
gemma-3-270m, float32, the same tasks and limit.

    python benchmarks/eval_throughput.py [--limit 15] [--data-dir ../shared/data]

Prints requests/s and tokens/s for each (tokens as HFLM feeds them; ours feeds fewer
because a prefix shared by neighbouring requests runs once), the ratios, the max per-request
log-likelihood difference, whether the task metrics are identical, and our achieved
FLOP rate as a fraction of this CPU's matmul throughput. The last line is JSON.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import SHARED_DATA, default_work_dir, matmul_gflops, print_summary
from lm_eval.models.huggingface import HFLM

from tailor.config.settings import REFERENCE_TASKS, DataConfig, ModelConfig
from tailor.evaluate.fast_lm import FastHFLM
from tailor.evaluate.harness import _task_manager, task_specs
from tailor.models.sources import materialize
from tailor.store.checkpoint import count_parameters, load_model


def build_requests(tasks, data, limit):
    """lm-eval Instances of every task, built once and scored by every contender."""
    manager = _task_manager()
    loaded = manager.load(task_specs(tasks, data, manager))["tasks"]
    instances = {}
    for name, task in loaded.items():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances[name] = task.instances
    return instances


def score(lm, instances) -> tuple[float, dict[str, list]]:
    """Seconds spent scoring, and the (loglik, greedy) answers per task."""
    answers, elapsed = {}, 0.0
    for name, reqs in instances.items():
        start = time.perf_counter()
        answers[name] = lm.loglikelihood(reqs, disable_tqdm=True)
        elapsed += time.perf_counter() - start
    return elapsed, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=15, help="documents per task")
    p.add_argument("--tasks", nargs="+", default=list(REFERENCE_TASKS))
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[4, 8, 16], help="HFLM batch sizes to try for its best"
    )
    p.add_argument(
        "--ours-batch-size",
        type=int,
        default=32,
        help="ours keeps no full-vocabulary logits, so it affords larger batches than HFLM",
    )
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()

    torch.manual_seed(0)
    ref = materialize(ModelConfig(source="embedded"), args.work_dir)
    model, tokenizer = load_model(ref)
    data = DataConfig(data_dir=args.data_dir)
    instances = build_requests(tuple(args.tasks), data, args.limit)
    n_requests = sum(len(v) for v in instances.values())
    # Tokens through the model per request, as HFLM feeds them (context + continuation - 1).
    probe = FastHFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    tokens = scored = 0
    for reqs in instances.values():
        for inst in reqs:
            ctx, cont = probe._encode_pair(*inst.args)
            tokens += len(ctx) + len(cont) - 1
            scored += len(cont)
    # Tokens ours actually feeds: a prefix shared by neighbouring requests counts once.
    ours_tokens = sum(
        len(seg)
        for reqs in instances.values()
        for seg in probe._segments([(None, *probe._encode_pair(*i.args)) for i in reqs])
    )
    print(
        f"model: embedded gemma-3-270m, float32, {torch.get_num_threads()} threads; tasks {args.tasks}, "
        f"limit {args.limit}: {n_requests} requests, {tokens} tokens ({ours_tokens} after prefix sharing), "
        f"{scored} scored tokens"
    )

    gflops = matmul_gflops()
    print(f"this CPU's float32 matmul: {gflops:.1f} GFLOP/s")

    runs = {}
    contenders = (
        [("hflm_bs1", HFLM, 1)]
        + [(f"hflm_bs{b}", HFLM, b) for b in args.batch_sizes]
        + [("ours", FastHFLM, args.ours_batch_size)]
    )
    for name, cls, bs in contenders:
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=bs)
        seconds, answers = score(lm, instances)
        runs[name] = {"seconds": seconds, "answers": answers}
        print(f"{name:>10}: {seconds:8.1f} s  {n_requests / seconds:7.2f} requests/s  {tokens / seconds:8.1f} tokens/s")

    best_name = min((n for n in runs if n.startswith("hflm_bs") and n != "hflm_bs1"), key=lambda n: runs[n]["seconds"])
    ours, bs1, best = runs["ours"], runs["hflm_bs1"], runs[best_name]
    max_diff, greedy_equal = 0.0, True
    for task in instances:
        for (la, ga), (lb, gb) in zip(ours["answers"][task], bs1["answers"][task]):
            max_diff = max(max_diff, abs(la - lb))
            greedy_equal &= ga == gb
    same_choices = all(
        _choices(instances[t], ours["answers"][t]) == _choices(instances[t], bs1["answers"][t]) for t in instances
    )

    non_embedding = count_parameters(model) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    # Decoder matmuls for every token fed, the output head only for scored tokens.
    flops = 2 * non_embedding * ours_tokens + 2 * head * scored
    achieved = flops / ours["seconds"] / 1e9
    summary = {
        "requests": n_requests,
        "tokens": tokens,
        "ours_tokens_fed": ours_tokens,
        "limit": args.limit,
        "tasks": args.tasks,
        "hflm_bs1_requests_per_s": n_requests / bs1["seconds"],
        "hflm_best_batch_size": int(best_name.removeprefix("hflm_bs")),
        "hflm_best_requests_per_s": n_requests / best["seconds"],
        "ours_requests_per_s": n_requests / ours["seconds"],
        "hflm_bs1_tokens_per_s": tokens / bs1["seconds"],
        "hflm_best_tokens_per_s": tokens / best["seconds"],
        "ours_tokens_per_s": tokens / ours["seconds"],
        "speedup_vs_hflm_bs1": bs1["seconds"] / ours["seconds"],
        "speedup_vs_hflm_best": best["seconds"] / ours["seconds"],
        "max_abs_loglik_diff": max_diff,
        "greedy_flags_identical": greedy_equal,
        "chosen_answers_identical": same_choices,
        "matmul_gflops": gflops,
        "ours_achieved_gflops": achieved,
        "ours_fraction_of_matmul_peak": achieved / gflops,
    }
    print(
        f"speed-up vs HFLM batch 1: {summary['speedup_vs_hflm_bs1']:.2f}x; "
        f"vs HFLM best (batch {summary['hflm_best_batch_size']}): {summary['speedup_vs_hflm_best']:.2f}x"
    )
    print(
        f"max |loglik(ours) - loglik(HFLM bs1)|: {max_diff:.2e}; greedy flags identical: {greedy_equal}; "
        f"chosen answers identical: {same_choices}"
    )
    print(f"ours: {achieved:.1f} GFLOP/s = {100 * achieved / gflops:.0f}% of this CPU's matmul throughput")
    print_summary(summary)


def _choices(reqs, answers) -> list:
    """Per document: index of the highest log-likelihood request (and greedy flags)."""
    docs: dict[int, list] = {}
    for inst, (ll, greedy) in zip(reqs, answers):
        docs.setdefault(inst.doc_id, []).append((ll, greedy))
    return [(max(range(len(v)), key=lambda i: v[i][0]), tuple(g for _, g in v)) for _, v in sorted(docs.items())]


if __name__ == "__main__":
    main()
