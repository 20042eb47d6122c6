"""One distillation training step: the book's notebook loop against llm-tailor's, on the
embedded gemma-3-270m at batch 8 x 128 tokens, float32.

    python benchmarks/kd_step.py [--steps 2] [--batch 8] [--seq 128]

Each mode runs in its own child process (so its peak resident memory is its own) on
the same batch and the same starting weights; the parent prints tokens/s, peak RSS and
the loss of the first step for each, and the ratios. The last line is JSON.

Modes: ``book`` is the notebook's step as written (full-vocabulary logits for teacher
and student, softmax / log_softmax / kl_div batchmean, teacher moved to the device
every batch); ``exact`` is ours with the book-compatible loss switch on (fused chunked
head, no full [B, T, V] tensors); ``exact_bf16`` the same with a bfloat16 teacher (not
bit-comparable, shown for its speed and memory); ``topk`` trains from the teacher's
cached top-64 logits (computed once beforehand in another process, timed separately: it
is paid once per sample, not per epoch) with no teacher in memory.

Also printed: the step's matmul work as a fraction of this CPU's matmul throughput,
i.e. how close a mode is to the floor that any float32 implementation of the same
step (same layers, same full-vocabulary head) must pay.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import SHARED_DATA, default_work_dir, matmul_gflops, print_summary


def batch(tokenizer, size: int, seq: int) -> dict[str, torch.Tensor]:
    from tailor.config import DataConfig, DistillConfig
    from tailor.distill import build_samples, corpus_texts

    cfg = DistillConfig(seq_len=seq, num_samples=size)
    return build_samples(tokenizer, corpus_texts(cfg, DataConfig(data_dir=str(SHARED_DATA))), seq, size)


def book_step(teacher, student, optimizer, ids, mask, T: float) -> float:
    # As in the notebook: teacher moved to the device each batch, full logits everywhere.
    teacher.to(ids.device)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    loss = F.kl_div(F.log_softmax(s_logits / T, dim=-1), F.softmax(t_logits / T, dim=-1), reduction="batchmean")
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def exact_step(teacher, student, optimizer, ids, mask, T: float) -> float:
    from tailor.distill import _final_hidden
    from tailor.kd_loss import LossSpec, kd_loss_chunked

    with torch.no_grad():
        t_hidden = _final_hidden(teacher, ids, mask)
    s_hidden = _final_hidden(student, ids, mask)
    loss = kd_loss_chunked(student, teacher, s_hidden, t_hidden, mask, ids, LossSpec(temperature=T, book=True))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def topk_step(topk, student, optimizer, ids, mask, T: float) -> float:
    from tailor.distill import _final_hidden
    from tailor.kd_loss import LossSpec, kd_loss_topk

    s_hidden = _final_hidden(student, ids, mask)
    loss = kd_loss_topk(student, s_hidden, topk, mask, ids, LossSpec(temperature=T, book=True))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


TOPK = 64


def child(mode: str, steps: int, size: int, seq: int, work_dir: str) -> dict:
    from tailor.checkpoint import load_model
    from tailor.config import ModelConfig
    from tailor.kd_loss import TopKTeacher
    from tailor.pruning import prune_layers
    from tailor.sources import materialize
    from tailor.teacher_cache import compute_topk

    ref = materialize(ModelConfig(source="embedded"), work_dir)
    cache_file = Path(work_dir) / "benchmark-kd-step-topk.pt"
    if mode == "topk_cache":
        teacher, tokenizer = load_model(ref)
        data = batch(tokenizer, size, seq)
        start = time.perf_counter()
        torch.save(compute_topk(teacher, data, TOPK, 2.0, batch_size=size), cache_file)
        return {"mode": mode, "seconds": time.perf_counter() - start, "tokens": int(data["attention_mask"].sum())}
    student, tokenizer = load_model(ref)
    if mode == "topk":
        cache = torch.load(cache_file)
        teacher = TopKTeacher(cache["values"], cache["indices"], cache["rest_logsumexp"], 2.0)
    else:
        teacher = load_model(ref, dtype="bfloat16" if mode == "exact_bf16" else "float32")[0]
        teacher.requires_grad_(False)
    prune_layers(student, [16, 17])
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    data = batch(tokenizer, size, seq)
    step = {"book": book_step, "exact": exact_step, "exact_bf16": exact_step, "topk": topk_step}[mode]
    losses, seconds = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses.append(step(teacher, student, optimizer, data["input_ids"], data["attention_mask"], 2.0))
        seconds.append(time.perf_counter() - start)
    tokens = int(data["attention_mask"].sum())
    # The first step includes one-off allocations; later steps are the steady state.
    steady = seconds[1:] or seconds
    return {"mode": mode, "first_loss": losses[0], "tokens_per_step": tokens,
            "tokens_per_s": tokens / (sum(steady) / len(steady)),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--work-dir", default=default_work_dir())
    p.add_argument("--child", choices=["book", "exact", "exact_bf16", "topk_cache", "topk"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.work_dir)))
        return

    results = {}
    for mode in ("book", "exact", "exact_bf16", "topk_cache", "topk"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq), "--work-dir", args.work_dir],
                             check=True, capture_output=True, text=True).stdout
        results[mode] = r = json.loads(out.strip().splitlines()[-1])
        if mode == "topk_cache":
            print(f"top-{TOPK} cache: {r['seconds']:.1f} s for {r['tokens']} tokens (once per sample)")
            continue
        print(f"{mode:>10}: {r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_gib']:6.2f} GiB  "
              f"loss {r['first_loss']:.6f}")
    book, exact, bf16, topk = results["book"], results["exact"], results["exact_bf16"], results["topk"]
    # Matmul work per token of one step: teacher forward, student forward, student
    # backward (twice the forward); the head counts for every position.
    from tailor.checkpoint import count_parameters, load_model
    from tailor.config import ModelConfig
    from tailor.sources import materialize

    model = load_model(materialize(ModelConfig(source="embedded"), args.work_dir))[0]
    per_token = 2 * (count_parameters(model) - model.get_input_embeddings().weight.numel()) \
        + 2 * model.get_output_embeddings().weight.numel()
    del model
    gflops = matmul_gflops()
    floor = lambda share_of_teacher: 1e9 * gflops / (per_token * (share_of_teacher + 3))  # noqa: E731
    summary = {
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "topk_k": TOPK,
        "matmul_gflops": gflops,
        "float32_floor_tokens_per_s": floor(1), "float32_floor_speedup_vs_book": floor(1) / book["tokens_per_s"],
        **{f"{m}_tokens_per_s": results[m]["tokens_per_s"] for m in ("book", "exact", "exact_bf16", "topk")},
        **{f"{m}_peak_rss_gib": results[m]["peak_rss_gib"] for m in ("book", "exact", "exact_bf16", "topk")},
        **{f"{m}_loss": results[m]["first_loss"] for m in ("book", "exact", "exact_bf16", "topk")},
        "topk_cache_seconds": results["topk_cache"]["seconds"],
        "exact_speedup": exact["tokens_per_s"] / book["tokens_per_s"],
        "exact_peak_memory_ratio": exact["peak_rss_gib"] / book["peak_rss_gib"],
        "loss_rel_diff": abs(exact["first_loss"] - book["first_loss"]) / abs(book["first_loss"]),
        "exact_bf16_speedup": bf16["tokens_per_s"] / book["tokens_per_s"],
        "exact_bf16_peak_memory_ratio": bf16["peak_rss_gib"] / book["peak_rss_gib"],
        "topk_speedup": topk["tokens_per_s"] / book["tokens_per_s"],
        "topk_peak_memory_ratio": topk["peak_rss_gib"] / book["peak_rss_gib"],
        "topk_loss_rel_diff": abs(topk["first_loss"] - book["first_loss"]) / abs(book["first_loss"]),
    }
    print(f"exact vs book: {summary['exact_speedup']:.2f}x tokens/s, {summary['exact_peak_memory_ratio']:.2f}x peak "
          f"memory, loss relative difference {summary['loss_rel_diff']:.2e}")
    print(f"exact, bf16 teacher vs book: {summary['exact_bf16_speedup']:.2f}x tokens/s, "
          f"{summary['exact_bf16_peak_memory_ratio']:.2f}x peak memory")
    print(f"top-{TOPK} cached vs book: {summary['topk_speedup']:.2f}x tokens/s, "
          f"{summary['topk_peak_memory_ratio']:.2f}x peak memory, loss relative difference "
          f"{summary['topk_loss_rel_diff']:.2e}")
    print(f"float32 matmul floor of a live-teacher step on this CPU ({gflops:.0f} GFLOP/s): "
          f"{summary['float32_floor_tokens_per_s']:.1f} tokens/s = {summary['float32_floor_speedup_vs_book']:.2f}x "
          f"the book's step")
    print_summary(summary)


if __name__ == "__main__":
    main()
