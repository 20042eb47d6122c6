"""Which decoder layers to remove: importance scores from a calibration set, and the choice.

Strategies (``prune.strategy``):

* ``last``: the last n layers (the book's choice).
* ``indices``: an explicit list.
* ``block_influence`` (ShortGPT): per layer, 1 - cosine similarity between its input and
  output hidden states; the n least influential layers go.
* ``angular`` ("The Unreasonable Ineffectiveness of the Deeper Layers"): the angular
  distance arccos(cos(h_l, h_{l+n})) / pi between the input of layer l and the input of
  layer l + n; the contiguous block of n layers with the smallest distance goes.
* ``leave_one_out``: per layer, the increase in calibration perplexity when that layer
  alone is skipped; the n layers whose absence costs least go.

Hidden-state scores are averaged over real (non-padding) tokens of the calibration set
and come from one pass with hooks on the decoder layers; leave-one-out needs one pass
per layer.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from tailor.config.settings import PruneConfig
from tailor.prune.pruning import PruneError, find_layers, prune_layers, resolve_indices

SCORED_STRATEGIES = ("block_influence", "angular", "leave_one_out")


@torch.no_grad()
def layer_scores(model, samples: dict[str, torch.Tensor], batch_size: int, strategies: tuple[str, ...]) -> dict:
    """Scores per strategy: ``block_influence`` and ``leave_one_out`` per layer, ``angular`` as
    an L x (L + 1) matrix (row l, column m: distance between the inputs of layers l and m;
    column L is the last layer's output)."""
    _, _, layers = find_layers(model)
    n_layers = len(layers)
    mask = samples["attention_mask"]
    if mask.shape[0] < batch_size:
        raise PruneError(
            f"prune.calibration_samples ({mask.shape[0]} samples built) is smaller than one batch "
            f"(prune.calibration_batch_size={batch_size})"
        )
    out: dict = {"num_layers": n_layers, "calibration_tokens": int(mask.sum())}
    if {"block_influence", "angular"} & set(strategies):
        cos_sum = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
        for ids, m in _batches(samples, batch_size):
            states = _layer_boundaries(model, layers, ids, m)  # n_layers + 1 tensors [tokens, hidden]
            stacked = F.normalize(torch.stack(states).double(), dim=-1)  # [L+1, tokens, hidden]
            cos_sum += torch.einsum("ath,bth->ab", stacked, stacked)
        cosine = (cos_sum / out["calibration_tokens"]).clamp(-1, 1)
        out["block_influence"] = [float(1 - cosine[i, i + 1]) for i in range(n_layers)]
        out["angular"] = [
            [float(torch.arccos(cosine[i, j]) / math.pi) if j > i else None for j in range(n_layers + 1)]
            for i in range(n_layers)
        ]
    if "leave_one_out" in strategies:
        base = _perplexity(model, samples, batch_size)
        out["calibration_perplexity"] = base
        increases = []
        for i in range(n_layers):
            with _without_layer(model, i):
                increases.append(_perplexity(model, samples, batch_size) - base)
        out["leave_one_out"] = increases
    return out


def choose_layers(cfg: PruneConfig, num_layers: int, scores: dict | None) -> list[int]:
    """The layer indices the configured strategy removes (sorted)."""
    n = cfg.num_layers
    if cfg.strategy not in SCORED_STRATEGIES:
        return resolve_indices(num_layers, n, cfg.indices if cfg.strategy == "indices" else None)
    resolve_indices(num_layers, n, None)  # validates n
    if scores is None or cfg.strategy not in scores:
        raise PruneError(f"prune.strategy={cfg.strategy!r} needs its layer scores")
    if cfg.strategy == "angular":
        distance = scores["angular"]
        start = min(range(num_layers - n + 1), key=lambda i: distance[i][i + n])
        return list(range(start, start + n))
    per_layer = scores[cfg.strategy]
    return sorted(sorted(range(num_layers), key=lambda i: per_layer[i])[:n])


def per_layer_series(scores: dict, strategy: str, n: int) -> list[float]:
    """One value per layer index for plotting (angular: the block of n starting there, NaN where it cannot start)."""
    if strategy == "angular":
        L = scores["num_layers"]
        return [scores["angular"][i][i + n] if i + n <= L else float("nan") for i in range(L)]
    return list(scores[strategy])


def _batches(samples: dict[str, torch.Tensor], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, samples["input_ids"].shape[0], batch_size):
        yield samples["input_ids"][start : start + batch_size], samples["attention_mask"][start : start + batch_size]


def _layer_boundaries(model, layers, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Input of every decoder layer and the last layer's output, at real tokens only."""
    captured: list[torch.Tensor] = []

    def before(_module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())

    def after(_module, _args, output):
        if len(captured) == len(layers):
            captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_pre_hook(before, with_kwargs=True) for layer in layers]
    handles.append(layers[-1].register_forward_hook(after))
    try:
        model.get_decoder()(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    keep = mask.bool().to(model.device)
    return [h[keep] for h in captured]


@torch.no_grad()
def _perplexity(model, samples: dict[str, torch.Tensor], batch_size: int) -> float:
    """exp(mean next-token negative log-likelihood over real tokens)."""
    total, count = 0.0, 0
    for ids, mask in _batches(samples, batch_size):
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False).logits
        targets = ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), -100)
        total += float(
            F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                targets.flatten().to(logits.device),
                ignore_index=-100,
                reduction="sum",
            )
        )
        count += int((targets != -100).sum())
    return math.exp(total / count)


@contextmanager
def _without_layer(model, index: int):
    """Skip one decoder layer for the duration (the model's config and layer indices are restored)."""
    parent, attr, layers = find_layers(model)
    config_values = dict(vars(model.config))
    layer_indices = [(m, m.layer_idx) for m in model.modules() if hasattr(m, "layer_idx")]
    prune_layers(model, [index])
    try:
        yield model
    finally:
        setattr(parent, attr, layers)
        for key, value in config_values.items():
            setattr(model.config, key, value)
        for module, idx in layer_indices:
            module.layer_idx = idx
