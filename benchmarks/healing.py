"""Healing ablation: which distillation recipe recovers pruning's damage, judged on all four
reference tasks at hundreds of documents each, with paired intervals.

    python benchmarks/healing.py [--limit 500] [--variants NAME ...] [--data-dir ../shared/data]

One base model (the embedded gemma-3-270m), one pruned student (by default its last 2 of 18
layers removed, the quick profile's; ``--remove-last N`` or ``--cut a-b`` removes others), and
one distilled student per recipe. Every checkpoint and
evaluation is cached in the work folder, so an interrupted run continues and a new
variant costs only its own distillation and evaluation. Each recipe is judged against
the pruned model on the same documents: per-task accuracy change with its paired 95%
interval, the pooled change and recovered share, LAMBADA perplexity, and the held-out
corpus perplexity. The row `quick_as_shipped_before` rebuilds the samples the quick
profile used before the fix (64 windows cut through documents without BOS, wikipedia
first) to show the old recipe beside the new sampling. ``--screen`` trains the variants and
prints only their held-out corpus perplexity and healing curve: recipes are chosen there,
on documents no training or evaluation reads, and then judged on the tasks. The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _common import SHARED_DATA, default_work_dir, parse_cut, print_summary
from safetensors.torch import load_file

from tailor.common.layout import WorkDir
from tailor.config.settings import (
    REFERENCE_TASKS,
    TEACHER_SOURCE,
    DataConfig,
    DistillConfig,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    PruneConfig,
    TailorConfig,
    load_config,
)
from tailor.data.corpus import heldout_samples, pad_rows, read_documents, training_samples
from tailor.data.tokenised import tokenise_corpus
from tailor.distill.activation_cache import ActivationCache, uses_activation_cache, write_activation_cache
from tailor.distill.generated import teacher_text_for
from tailor.distill.record import TrainingRecord
from tailor.distill.trainer import Distiller, fill_removed_block
from tailor.evaluate.joint import evaluate_checkpoints
from tailor.evaluate.perplexity import heldout_perplexity
from tailor.models.precision import load_teacher
from tailor.models.sources import materialize, source_num_layers
from tailor.prune.pruning import prune_checkpoint
from tailor.report.healing import healing_summary
from tailor.store.checkpoint import (
    existing_checkpoint,
    load_model,
    load_tokenizer,
    save_model,
    stable_hash,
    write_checkpoint,
)

TS, WIKI, C4 = "corpus/tinystories_sample.jsonl", "corpus/wikipedia_sample.jsonl", "corpus/c4_sample.jsonl"
# The quick profile's recipe before the fix (its optimiser settings; samples rebuilt below).
QUICK_BEFORE = dict(
    learning_rate=5e-5,
    batch_size=4,
    grad_accum=2,
    seq_len=128,
    epochs=1,
    num_samples=64,
    bf16_autocast="auto",
    gradient_checkpointing=True,
    heldout_docs=16,
)
# Every other row: BOS-first document starts, a held-out slice, warm-up and cosine decay.
RECIPE = dict(QUICK_BEFORE, warmup_steps=2, lr_schedule="cosine")
MIX = {TS: 0.6, WIKI: 0.4}  # no C4: its document starts are navigation menus and link lists
# Hidden-state rows: two BOS-first windows of most TinyStories and Wikipedia training documents.
HIDDEN = dict(
    objective="hidden",
    hidden_loss="mse",
    learning_rate=1e-4,
    warmup_steps=8,
    lr_schedule="cosine",
    batch_size=8,
    grad_accum=2,
    seq_len=128,
    epochs=1,
    num_samples=2048,
    windows_per_doc=2,
    corpus_mix={TS: 1, WIKI: 3},
    freeze_embeddings=True,
    teacher_dtype="float32",
    bf16_autocast=False,
    heldout_every=32,
)
# The same on about 2.5 times the tokens: nearly every BOS-first window the TinyStories and
# Wikipedia files hold (up to 8 per document), 288 optimiser steps.
WHOLE_CORPUS = dict(HIDDEN, train_last_layers=4, num_samples=4608, windows_per_doc=8, corpus_mix={TS: 1, WIKI: 7})
# The quick profile's logit KD until 2026-12-07: 8 steps on 64 TinyStories document starts.
QUICK_LOGIT_KD = dict(QUICK_BEFORE, corpus_mix={TS: 1})
# The heal profile's logit KD until 2026-12-07: two BOS-first windows per TinyStories story,
# 72 steps at a constant learning rate (the rows docs/healing.md compares against).
HEAL_LOGIT_KD = dict(QUICK_BEFORE, num_samples=576, windows_per_doc=2, heldout_every=8, freeze_embeddings=True)
# In order of what they answer: the cause, its fix, the corpus domain, what trains, the
# learning rate, a cross-entropy mix.
VARIANTS: dict[str, dict] = {
    "quick_as_shipped_before": dict(QUICK_BEFORE, corpus_mix={WIKI: 1, C4: 1, TS: 1}),
    "bos_first_same_corpus": dict(RECIPE, corpus_mix={WIKI: 1, C4: 1, TS: 1}),
    "tinystories_only": dict(RECIPE, corpus_mix={TS: 1}),
    "tinystories_only_constant_lr": dict(QUICK_BEFORE, corpus_mix={TS: 1}),
    "tinystories_only_constant_lr_256": dict(QUICK_BEFORE, corpus_mix={TS: 1}, num_samples=256, heldout_every=8),
    # The divergence: reverse KL (mode-seeking) and the symmetric JSD against forward KL's
    # mass-covering fit, which lowers perplexity while LAMBADA's greedy last word can get worse.
    "tinystories_only_constant_lr_256_reverse_kl": dict(
        QUICK_BEFORE, corpus_mix={TS: 1}, num_samples=256, heldout_every=8, loss="reverse_kl"
    ),
    "tinystories_only_constant_lr_256_jsd": dict(
        QUICK_BEFORE, corpus_mix={TS: 1}, num_samples=256, heldout_every=8, loss="jsd"
    ),
    "ts60_wiki40_last4_layers": dict(RECIPE, corpus_mix=MIX, freeze_embeddings=True, train_last_layers=4),
    "ts60_wiki40_ce_alpha_0.5": dict(RECIPE, corpus_mix=MIX, alpha=0.5),
    "ts60_wiki40_lr1e-5": dict(RECIPE, corpus_mix=MIX, learning_rate=1e-5),
    "ts60_wiki40": dict(RECIPE, corpus_mix=MIX),
    "wikipedia_c4_only": dict(RECIPE, corpus_mix={WIKI: 0.6, C4: 0.4}),
    # The shipped profiles' distillation recipes, read from the profile files: run each row with
    # its profile's cut (quick: --cut 15-16, heal: --cut 13-16).
    "quick_profile": load_config("quick").distill.model_dump(),
    "heal_profile": load_config("heal").distill.model_dump(),
    # What trains: the tied embedding/output head fixed (the heal profile's logit KD until
    # 2026-12-07) or trained with the rest (its recipe before 2026-11-29); the same question
    # for the quick recipe.
    "heal_profile_frozen_embeddings": dict(HEAL_LOGIT_KD, freeze_embeddings=True),
    "heal_profile_trained_embeddings": dict(HEAL_LOGIT_KD, freeze_embeddings=False),
    "quick_profile_frozen_embeddings": dict(QUICK_LOGIT_KD, freeze_embeddings=True),
    # Training noise: the quick recipe with other sample orders (the paired intervals cover
    # the documents scored, not which run of training produced the model).
    **{f"quick_profile_seed{seed}": dict(QUICK_LOGIT_KD, seed=seed) for seed in (1, 2)},
    # Objectives beyond logit KD (4 layers removed): the teacher's final hidden state matched
    # by the last remaining layers and the final norm, the embedding/head and every earlier
    # layer fixed, so the student runs from the teacher's own trunk (float32 on both sides).
    "hidden_mse_last2": dict(HIDDEN, train_last_layers=2),
    # The same objective sized for the quick profile (2 layers removed: run with --remove-last 2):
    # the last 2 of 16 layers, 512 BOS-first TinyStories and Wikipedia windows, 32 steps.
    "quick_hidden_mse_last2": dict(
        QUICK_LOGIT_KD,
        **dict(HIDDEN, train_last_layers=2, num_samples=512, warmup_steps=4, heldout_every=0),
        gradient_checkpointing=False,
    ),
    # The data source: a quarter of the samples are the teacher's own text, sampled from BOS at
    # the default generate.* settings (temperature 1, top-p 0.95), written once per teacher.
    "hidden_mse_last4_teacher_text": dict(HIDDEN, train_last_layers=4, corpus_mix={TEACHER_SOURCE: 1, TS: 1, WIKI: 2}),
    "hidden_mse_last4": dict(HIDDEN, train_last_layers=4),
    "hidden_mse_last4_whole_corpus": WHOLE_CORPUS,
    # Another distillation seed (another sample order): does the row survive it?
    "hidden_mse_last4_whole_corpus_seed1": dict(WHOLE_CORPUS, seed=1),
    # Capacity: the whole-corpus recipe's relative MSE is still 0.16 at its last steps, with 4
    # layers standing in for the teacher's 8. Twice the trainable layers, on the same samples.
    "hidden_mse_last8_whole_corpus": dict(WHOLE_CORPUS, train_last_layers=8),
    # Screens, run with --screen (held-out corpus perplexity only, no task data): the first 96
    # steps' samples of the whole-corpus recipe at two learning rates, with --remove-last 4 and
    # with --cut 13-16 (the last layer kept: the student's last trainable layer is the teacher's).
    "screen_96_steps": dict(WHOLE_CORPUS, num_samples=1536),
    "screen_96_steps_lr4e-4": dict(WHOLE_CORPUS, num_samples=1536, learning_rate=4e-4),
    # What the screens chose, on all 288 steps: run it with --cut 13-16.
    "hidden_mse_last4_whole_corpus_lr4e-4": dict(WHOLE_CORPUS, learning_rate=4e-4),
    # The same recipe sized for the quick profile (2 layers removed): 64 steps, screened with
    # --remove-last 2 and with --cut 15-16 (the last layer kept).
    "quick_hidden_mse_last4_lr4e-4": dict(WHOLE_CORPUS, learning_rate=4e-4, num_samples=1024, warmup_steps=4),
    # More passes over the same corpus, from the activation cache (run with --cut 13-16): the
    # heal profile's recipe over 2 and 3 epochs (the cosine schedule spans all of them), and
    # over 2 epochs with the state at the removed block's end as a second target.
    "heal_recipe_2_epochs": dict(WHOLE_CORPUS, learning_rate=4e-4, epochs=2),
    "heal_recipe_3_epochs": dict(WHOLE_CORPUS, learning_rate=4e-4, epochs=3),
    "heal_recipe_2_epochs_span": dict(
        WHOLE_CORPUS, learning_rate=4e-4, epochs=2, objective={"hidden": 1.0, "span": 1.0}
    ),
    "hidden_mse_replacement": dict(HIDDEN, replacement_layer=True, train_last_layers=1),
    "hidden_cosine_last4": dict(HIDDEN, train_last_layers=4, hidden_loss="cosine"),
    "logits_last4": dict(HIDDEN, train_last_layers=4, objective="logits"),
    # Training-free: a least-squares linear map in place of the removed block, fitted on the
    # teacher's activations over 256 training samples (TinyStories and Wikipedia, no evaluation
    # data) and folded into the last layer before the cut (tailor.prune.linear_map).
    "linear_map_alone": dict(HIDDEN, linear_map=True, linear_map_samples=256, num_samples=256, epochs=0),
    # The combination: the same map as the starting point of hidden_mse_last4's training.
    "linear_map_then_hidden_mse_last4": dict(HIDDEN, train_last_layers=4, linear_map=True, linear_map_samples=256),
    # Precision: the quick profile's former recipe with every matmul in float32 (what a CPU without native
    # bfloat16 runs): does bfloat16 change what the recipe heals, and what does it save?
    "quick_profile_float32": dict(QUICK_LOGIT_KD, bf16_autocast=False, teacher_dtype="float32"),
}


def windowed_samples_before_fix(tokenizer, data: DataConfig, seq_len: int, num_samples: int) -> dict:
    """The old sampling: every document cut into seq_len windows, only the first starting with BOS."""
    rows = []
    for rel in (WIKI, C4, TS):
        for text in read_documents(Path(data.data_dir) / rel):
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            rows += [ids[s : s + seq_len] for s in range(0, len(ids), seq_len) if len(ids[s : s + seq_len]) >= 2]
            if len(rows) >= num_samples:
                return pad_rows(tokenizer, rows[:num_samples], seq_len)
    return pad_rows(tokenizer, rows, seq_len)


def teacher_text(cfg: DistillConfig, base, work: Path) -> dict | None:
    """The teacher's own text the mix asks for, at the default generate.* settings (made once, resumable)."""
    started = time.perf_counter()
    tokens = teacher_text_for(TailorConfig(distill=cfg, work_dir=str(work)), base)
    if tokens is None:
        return None
    print(f"  teacher text ready in {time.perf_counter() - started:.0f} s", flush=True)
    return load_file(tokens.path)


def distilled_checkpoint(name: str, cfg: DistillConfig, base, pruned, data: DataConfig, work: Path):
    """The variant's distilled student (cached by everything it depends on) and its training record."""
    # The teacher's text depends on the generate.* settings too (their defaults here).
    generated = [GenerateConfig().model_dump()] if TEACHER_SOURCE in cfg.corpus_mix else []
    key = stable_hash(cfg.model_dump(), base.fingerprint, pruned.fingerprint, *generated)
    # A variant with the same settings under another name (a profile's recipe) shares the checkpoint.
    out = next(
        (p for p in sorted((work / "healing").glob(f"*-{key}")) if existing_checkpoint(p)),
        work / "healing" / f"{name}-{key}",
    )
    if (done := existing_checkpoint(out)) is not None:
        return done, TrainingRecord.from_dict(json.loads((out / "record.json").read_text()))
    student, tokenizer = load_model(pruned)
    activations = None
    if name != "quick_as_shipped_before" and TEACHER_SOURCE not in cfg.corpus_mix and uses_activation_cache(cfg):
        # As the flow trains: the teacher's targets (and the shared trunk's output) computed once
        # into the work folder's activation cache, the same weights to the bit as a live teacher.
        train = tokenise_corpus(base, cfg, PruneConfig(), data, str(work))["train"]
        samples = {k: v[: cfg.num_samples] for k, v in train.samples().items()}
        started = time.perf_counter()
        ref = write_activation_cache(base, pruned, cfg, train, WorkDir(work).activations, WorkDir(work).probes)
        print(f"  activation cache ready in {time.perf_counter() - started:.0f} s", flush=True)
        activations = ActivationCache(ref, samples)
    elif name == "quick_as_shipped_before":
        samples = windowed_samples_before_fix(tokenizer, data, cfg.seq_len, cfg.num_samples)
    else:
        samples = training_samples(tokenizer, cfg, data, teacher_text=teacher_text(cfg, base, work))
    fill_removed_block(student, base, cfg, samples)
    teacher = (
        None
        if activations is not None
        else load_teacher(base, cfg.teacher_dtype, samples["input_ids"], probe_dir=WorkDir(work).probes)
    )
    # The healing curve (held-out perplexity every heldout_every steps), as the flow records it.
    curve = heldout_samples(tokenizer, cfg, data) if cfg.heldout_every else None
    started = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if step % 16 == 0:
            print(f"  step {step}: loss {loss:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)

    record = Distiller(
        teacher,
        student,
        samples,
        cfg,
        activations=activations,
        heldout=curve,
        on_step=on_step,
        probe_dir=WorkDir(work).probes,
    ).fit()
    del teacher

    def save(tmp: Path) -> None:
        save_model(student, tokenizer, tmp)
        (tmp / "record.json").write_text(json.dumps(record.to_dict()))

    return write_checkpoint(out, save), record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="documents per task")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--tasks",
        nargs="+",
        default=list(REFERENCE_TASKS),
        help="tasks to judge on (a screening run may use fewer; a recipe is judged on all four)",
    )
    cut = p.add_mutually_exclusive_group()
    cut.add_argument(
        "--remove-last",
        type=int,
        default=2,
        help="decoder layers removed from the end (the quick profile removes 2 of 18)",
    )
    cut.add_argument(
        "--cut",
        help="the layers removed instead, a range a-b (both ends removed) or a comma-separated list: "
        "13-16 removes 4 layers and keeps the last",
    )
    p.add_argument(
        "--eval-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="evaluation precision (every model is scored the same way)",
    )
    p.add_argument(
        "--screen",
        action="store_true",
        help="train the variants and print their held-out corpus perplexity and healing curve only: "
        "a choice among recipes that reads no evaluation data",
    )
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--work-dir", default=default_work_dir())
    args = p.parse_args()
    torch.manual_seed(0)
    work = Path(args.work_dir)
    data = DataConfig(data_dir=args.data_dir)
    eval_cfg = EvalConfig(tasks=args.tasks, limit=args.limit, batch_size=32, dtype=args.eval_dtype)
    base = materialize(ModelConfig(source="embedded"), str(work))
    layers = source_num_layers(ModelConfig(source="embedded"))
    removed = parse_cut(args.cut, layers) if args.cut else list(range(layers - args.remove_last, layers))
    pruned = prune_checkpoint(base, removed, str(work))[0]

    def evaluate(refs: dict) -> dict[str, dict]:
        """Every model on the same documents, in one pass: the layers they share with the original
        run once, and answers stored by earlier runs (the original's, the pruned model's) are reused."""
        start = time.perf_counter()
        joint = evaluate_checkpoints(refs, eval_cfg, data, str(work))[0]
        print(
            f"  evaluated {', '.join(refs)} in {time.perf_counter() - start:.0f} s "
            f"({joint.scored_requests} requests scored; shared layers {joint.trunk_depths})",
            flush=True,
        )
        return joint.results

    heldout_cfg = DistillConfig(corpus_mix={TS: 1, WIKI: 1, C4: 1}, heldout_docs=16)
    heldout = heldout_samples(load_tokenizer(base), heldout_cfg, data)

    def heldout_ppl(ref) -> float:
        return heldout_perplexity(load_model(ref)[0], heldout)["perplexity"]

    fixed_ppl = {"original": heldout_ppl(base), "pruned": heldout_ppl(pruned)}
    distilled = {}
    for name in args.variants:
        print(f"variant {name}", flush=True)
        distilled[name] = distilled_checkpoint(name, DistillConfig(**VARIANTS[name]), base, pruned, data, work)
    if args.screen:
        print_screen(removed, fixed_ppl, {name: (heldout_ppl(ref), rec) for name, (ref, rec) in distilled.items()})
        return
    results = evaluate({"original": base, "pruned": pruned, **{name: ref for name, (ref, _) in distilled.items()}})
    fixed = {"original": results["original"], "pruned": results["pruned"]}
    rows = {}
    for name, (ref, record) in distilled.items():
        summary = healing_summary({**fixed, "distilled": results[name]})
        rows[name] = {
            "healing": summary,
            "heldout_ppl": heldout_ppl(ref),
            "train_seconds": record.train_seconds,
            "train_tokens": record.train_tokens,
            "trainable_parameters": record.trainable_parameters,
            "optimizer_steps": record.optimizer_steps,
            "final_loss": record.losses[-1] if record.losses else None,
        }
        print_row(name, rows[name])

    print()
    print(
        f"layers removed {removed}; limit {args.limit} documents per task, evaluation {args.eval_dtype}; "
        f"held-out perplexity "
        f"original {fixed_ppl['original']:.2f}, pruned {fixed_ppl['pruned']:.2f}"
    )
    header = [
        "variant",
        *[f"{t} Δacc [95% CI]" for t in args.tasks],
        "pooled Δacc [95% CI]",
        "recovered [95% CI]",
        "lambada ppl",
        "held-out ppl",
        "train s",
        "train tokens",
        "trainable",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, row in rows.items():
        print_row(name, row, markdown=True)
    print_summary(
        {
            "removed_layers": removed,
            "limit": args.limit,
            "eval_dtype": args.eval_dtype,
            "heldout_ppl": fixed_ppl,
            "variants": {
                n: {
                    "pooled": r["healing"]["pooled"],
                    "per_task": r["healing"]["per_task"],
                    "perplexity": r["healing"]["perplexity"],
                    "harmed": r["healing"]["harmed"],
                    "heldout_ppl": r["heldout_ppl"],
                    "train_seconds": r["train_seconds"],
                    "train_tokens": r["train_tokens"],
                    "trainable_parameters": r["trainable_parameters"],
                }
                for n, r in rows.items()
            },
        }
    )


def print_screen(removed: list[int], fixed_ppl: dict, screened: dict[str, tuple[float, TrainingRecord]]) -> None:
    """Each screened recipe's held-out corpus perplexity, its healing curve and its loss by 32 steps."""
    print(
        f"\nlayers removed {removed}; held-out perplexity original {fixed_ppl['original']:.2f}, "
        f"pruned {fixed_ppl['pruned']:.2f}"
    )
    print("| variant | held-out ppl | healing curve (step: ppl) | loss, mean of each 32 steps | train s |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, (ppl, record) in screened.items():
        losses = record.losses
        means = [sum(losses[i : i + 32]) / len(losses[i : i + 32]) for i in range(0, len(losses), 32)]
        curve = ", ".join(f"{step}: {p:.2f}" for step, p in record.heldout_curve)
        print(f"| {name} | {ppl:.2f} | {curve} | {', '.join(f'{m:.3f}' for m in means)} | {record.train_seconds:.0f} |")
        rows[name] = {"heldout_ppl": ppl, "healing_curve": record.heldout_curve, "loss_means_32": means}
    print_summary({"removed_layers": removed, "heldout_ppl": fixed_ppl, "screened": rows})


def print_row(name: str, row: dict, markdown: bool = False) -> None:
    h = row["healing"]

    def d(r: dict) -> str:
        lo, hi = r["delta_ci95"]
        return f"{r['delta_vs_pruned']:+.3f} [{lo:+.3f}, {hi:+.3f}]" + (" *" if lo > 0 or hi < 0 else "")

    pooled = h["pooled"]
    share = "cannot tell" if pooled["recovered_share"] is None else f"{pooled['recovered_share']:.0%}"
    if pooled.get("recovered_share_ci95") and pooled["recovered_share"] is not None:
        share += " [{:.0%}, {:.0%}]".format(*pooled["recovered_share_ci95"])
    ppl = h["perplexity"]
    cells = [
        name,
        *[d(r) for r in h["per_task"].values()],
        d(pooled),
        share,
        f"{ppl['pruned']:.1f} -> {ppl['distilled']:.1f}" if ppl else "n/a",
        f"{row['heldout_ppl']:.2f}",
        f"{row['train_seconds']:.0f}",
        f"{row.get('train_tokens', 0):,}",
        f"{row.get('trainable_parameters', 0):,}",
    ]
    print(("| " + " | ".join(cells) + " |") if markdown else "  " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
