"""Generation speed measured the book's way (greedy, fixed prompts, warm-up, timed runs),
with the models interleaved so that they share the machine's slow and fast minutes.

A shared 2-core machine drifts by tens of percent within minutes: timing one model after
another turns that drift into a fake speed-up. Here every round times each model once, in
turn, and a speed-up is the median of the per-round ratios with a bootstrap interval over
rounds.

Generation cost depends on the architecture, not on the weights: pruned and distilled
models (the same layers, other values) run the same kernels on the same shapes. So each
distinct architecture is timed once and every model of it carries that timing
(``timed_as``, ``shares_timing_with``); timing both only measured the machine's noise
and was the stage's largest cost.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn as nn

from tailor.config.settings import SpeedConfig
from tailor.prune.pruning import find_layers
from tailor.store.checkpoint import CheckpointRef, count_parameters, folder_size_bytes, load_model, stable_hash

# The config fields that shape the compute of one generated token (with the parameters'
# shapes, which already fix most of them: these catch what shapes alone do not, such as
# the attention pattern of each layer and its window).
_COST_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_hidden_layers",
    "layer_types",
    "vocab_size",
    "sliding_window",
    "tie_word_embeddings",
    "_attn_implementation",
)


def architecture_signature(model: nn.Module) -> str:
    """A hash of what decides a model's generation cost: its class, the config fields that
    shape compute, and every parameter's name, shape, dtype and device (not the values)."""
    config = model.config
    fields = {k: getattr(config, k, None) for k in _COST_FIELDS}
    params = [(name, list(p.shape), str(p.dtype), str(p.device)) for name, p in model.named_parameters()]
    return stable_hash(type(model).__name__, fields, params)


def macs_per_token(model: nn.Module) -> int:
    """Multiply-adds per generated token at short context: every ``nn.Linear`` of the decoder
    layers (in x out features) plus the output head (vocabulary x hidden).

    Attention's score and value products (which grow with the context) and the norms and
    activations are left out: for a few dozen tokens of context they are a small share, and
    the count then depends on the architecture alone.
    """
    _, _, layers = find_layers(model)
    linear = sum(m.in_features * m.out_features for m in layers.modules() if isinstance(m, nn.Linear))
    head = model.get_output_embeddings()
    if isinstance(head, nn.Linear):
        return linear + head.in_features * head.out_features
    return linear + int(model.config.vocab_size) * int(model.config.hidden_size)


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


def group_by_architecture(models: dict[str, tuple]) -> dict[str, list[str]]:
    """Representative name -> every model name of its architecture (the representative first),
    representatives in the order their first model appears."""
    groups: dict[str, list[str]] = {}
    for name, (model, _) in models.items():
        groups.setdefault(architecture_signature(model), []).append(name)
    return {names[0]: names for names in groups.values()}


def time_by_architecture(models: dict[str, tuple], cfg: SpeedConfig) -> dict[str, dict]:
    """``time_interleaved`` over one representative of each architecture; every model gets its
    representative's figures (the same lists), ``timed_as`` and ``shares_timing_with``."""
    groups = group_by_architecture(models)
    timing = time_interleaved({rep: models[rep] for rep in groups}, cfg)
    out = {}
    for rep, names in groups.items():
        for name in names:
            out[name] = {
                **timing[rep],
                "timed_as": rep,
                "shares_timing_with": [n for n in names if n != name],
            }
    return {name: out[name] for name in models}


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
    """Size, structure, multiply-adds per token, generation timing (one per distinct
    architecture, interleaved) and a sample continuation of each checkpoint."""
    models = {name: load_model(ref.verify()) for name, ref in refs.items()}
    timing = time_by_architecture(models, cfg)
    return {
        name: {
            "params": count_parameters(model),
            "layers": int(model.config.num_hidden_layers),
            "checkpoint_bytes": folder_size_bytes(refs[name].path),
            "macs_per_token": macs_per_token(model),
            "architecture": architecture_signature(model),
            **timing[name],
            "sample_prompt": cfg.sample_prompt,
            # Per model, not per architecture: the weights decide what it says.
            "sample_continuation": sample_continuation(model, tokenizer, cfg.sample_prompt),
            "threads": torch.get_num_threads(),
        }
        for name, (model, tokenizer) in models.items()
    }
