"""Generation speed measured the book's way: greedy, fixed prompts, warm-up, timed runs."""

from __future__ import annotations

import statistics
import time

import torch

from .checkpoint import CheckpointRef, count_parameters, folder_size_bytes, load_model
from .config import SpeedConfig


def measure_generation(model, tokenizer, cfg: SpeedConfig) -> dict:
    """Mean/std seconds per run (all prompts, one after another) and new tokens per second."""
    encoded = [tokenizer(p, return_tensors="pt").to(model.device) for p in cfg.prompts]

    def one_run() -> int:
        new_tokens = 0
        for enc in encoded:
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            new_tokens += out.shape[1] - enc["input_ids"].shape[1]
        return new_tokens

    with torch.inference_mode():
        for _ in range(cfg.warmup_runs):
            one_run()
        times, tokens = [], 0
        for _ in range(cfg.timed_runs):
            start = time.perf_counter()
            tokens += one_run()
            times.append(time.perf_counter() - start)
    mean = statistics.fmean(times)
    return {
        "gen_time_mean_s": mean,
        "gen_time_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "tokens_per_s": tokens / sum(times),
        "new_tokens_per_run": tokens / len(times),
        "timed_runs": len(times),
    }


def sample_continuation(model, tokenizer, prompt: str, max_new_tokens: int = 20) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def profile_checkpoint(ref: CheckpointRef, cfg: SpeedConfig) -> dict:
    """Size, structure, generation speed and a sample continuation of one checkpoint."""
    model, tokenizer = load_model(ref)
    return {
        "params": count_parameters(model),
        "layers": int(model.config.num_hidden_layers),
        "checkpoint_bytes": folder_size_bytes(ref.path),
        **measure_generation(model, tokenizer, cfg),
        "sample_prompt": cfg.sample_prompt,
        "sample_continuation": sample_continuation(model, tokenizer, cfg.sample_prompt),
        "threads": torch.get_num_threads(),
    }
