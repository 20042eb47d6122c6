"""One distillation training step: the book's notebook loop against llm-tailor's, on the
embedded gemma-3-270m at batch 8 x 128 tokens, float32.

    python benchmarks/kd_step.py [--steps 2] [--batch 8] [--seq 128]

Each mode runs in its own child process (so its peak resident memory is its own) on
the same batch and the same starting weights; the parent prints tokens/s, peak RSS and
the loss of the first step for each, and the ratios. The last line is JSON.

Modes: ``book`` is the notebook's step as written (full-vocabulary logits for teacher
and student, softmax / log_softmax / kl_div batchmean, teacher moved to the device
every batch); ``exact`` is ours with the book-compatible loss switch on (chunked head,
no full [B, T, V] tensors). A top-k cached-teacher mode is not implemented yet.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from _common import SHARED_DATA, default_work_dir, print_summary


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


def child(mode: str, steps: int, size: int, seq: int, work_dir: str) -> dict:
    from tailor.checkpoint import load_model
    from tailor.config import ModelConfig
    from tailor.pruning import prune_layers
    from tailor.sources import materialize

    ref = materialize(ModelConfig(source="embedded"), work_dir)
    teacher, tokenizer = load_model(ref)
    student, _ = load_model(ref)
    prune_layers(student, [16, 17])
    teacher.requires_grad_(False)
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    data = batch(tokenizer, size, seq)
    step = {"book": book_step, "exact": exact_step}[mode]
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
    p.add_argument("--child", choices=["book", "exact"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.work_dir)))
        return

    results = {}
    for mode in ("book", "exact"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq), "--work-dir", args.work_dir],
                             check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:>6}: {r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_gib']:6.2f} GiB  "
              f"loss {r['first_loss']:.6f}")
    book, exact = results["book"], results["exact"]
    summary = {
        "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "book_tokens_per_s": book["tokens_per_s"], "exact_tokens_per_s": exact["tokens_per_s"],
        "book_peak_rss_gib": book["peak_rss_gib"], "exact_peak_rss_gib": exact["peak_rss_gib"],
        "book_loss": book["first_loss"], "exact_loss": exact["first_loss"],
        "exact_speedup": exact["tokens_per_s"] / book["tokens_per_s"],
        "exact_peak_memory_ratio": exact["peak_rss_gib"] / book["peak_rss_gib"],
        "loss_rel_diff": abs(exact["first_loss"] - book["first_loss"]) / abs(book["first_loss"]),
        "topk_speedup": None,
    }
    print(f"exact vs book: {summary['exact_speedup']:.2f}x tokens/s, {summary['exact_peak_memory_ratio']:.2f}x peak "
          f"memory, loss relative difference {summary['loss_rel_diff']:.2e}; top-k cached mode: not implemented")
    print_summary(summary)


if __name__ == "__main__":
    main()
