"""Generation speed measured the book's way (greedy, fixed prompts, warm-up, timed runs),
with the models interleaved so that they share the machine's slow and fast minutes.

A shared 2-core machine drifts by tens of percent within minutes: timing one model after
another turns that drift into a fake speed-up. Here every round times each model once, in
turn, and a speed-up is the median of the per-round ratios with a bootstrap interval over
rounds. Two models of the same architecture (pruned and distilled) must tie within it;
when they do not, the measurement is flagged as noisy.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from tailor.config.settings import SpeedConfig
from tailor.store.checkpoint import CheckpointRef, count_parameters, folder_size_bytes, load_model


def _one_run(model, tokenizer, cfg: SpeedConfig) -> tuple[float, int]:
    """Seconds and new tokens of one run: every prompt, one after another."""
    new_tokens = 0
    start = time.perf_counter()
    for prompt in cfg.prompts:
        enc = tokenizer(prompt, return_tensors="pt").to(model.device)
        out = model.generate(
            **enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new_tokens += out.shape[1] - enc["input_ids"].shape[1]
    return time.perf_counter() - start, new_tokens


def time_interleaved(models: dict[str, tuple], cfg: SpeedConfig) -> dict[str, dict]:
    """Warm every model up, then ``cfg.timed_runs`` rounds, each timing every model once in turn."""
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(cfg.warmup_runs):
            for model, tokenizer in models.values():
                _one_run(model, tokenizer, cfg)
        for _ in range(cfg.timed_runs):
            for name, (model, tokenizer) in models.items():
                runs[name].append(_one_run(model, tokenizer, cfg))
    out = {}
    for name, timed in runs.items():
        times = [t for t, _ in timed]
        out[name] = {
            "run_times_s": times,
            "gen_time_mean_s": statistics.fmean(times),
            "gen_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
            "tokens_per_s": sum(n for _, n in timed) / sum(times),
            "new_tokens_per_run": sum(n for _, n in timed) / len(timed),
            "timed_runs": len(timed),
        }
    return out


def speedup_interval(base_times: list[float], times: list[float], iters: int = 2000, seed: int = 0) -> dict:
    """Median over rounds of base time / model time, with a bootstrap 95% interval over rounds."""
    ratios = np.asarray(base_times) / np.asarray(times)
    idx = np.random.default_rng(seed).integers(0, len(ratios), size=(iters, len(ratios)))
    low, high = np.quantile(np.median(ratios[idx], axis=1), [0.025, 0.975])
    return {"median": float(np.median(ratios)), "ci95": [float(low), float(high)], "rounds": int(len(ratios))}


def sample_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def profile_checkpoints(refs: dict[str, CheckpointRef], cfg: SpeedConfig) -> dict[str, dict]:
    """Size, structure, interleaved generation timing and a sample continuation of each checkpoint."""
    models = {name: load_model(ref.verify()) for name, ref in refs.items()}
    timing = time_interleaved(models, cfg)
    return {
        name: {
            "params": count_parameters(model),
            "layers": int(model.config.num_hidden_layers),
            "checkpoint_bytes": folder_size_bytes(refs[name].path),
            **timing[name],
            "sample_prompt": cfg.sample_prompt,
            "sample_continuation": sample_continuation(model, tokenizer, cfg.sample_prompt),
            "threads": torch.get_num_threads(),
        }
        for name, (model, tokenizer) in models.items()
    }
