"""A closed-form linear map in place of a removed block (ReplaceMe, adapted to post-norms).

ReplaceMe (Shopkhoev et al., 2025) replaces a contiguous block of removed layers with a
linear map T fitted by least squares on calibration activations: with M the MLP output of
the last layer before the block and R the residual it is added to, T makes ``R + M T``
match the block's output. In Llama, M is the down-projection's output, so T folds into its
weights. In Gemma 3, M leaves the MLP through a post-norm (RMSNorm, per-channel gain g),
which a linear map cannot pass through. Two closed-form steps keep the checkpoint a stock
one, the same shape as the pruned model:

1. Fold ``A = diag(g) T diag(g)^-1`` into the down-projection. The norm then gives
   ``unit(D A) * g = (D diag(g) T) / rms(D A)``: the fitted direction, off by one scale per token.
2. Refit the post-norm's gain per channel by least squares on those directions (the norm
   fixes each token's scale; the gain is what is left to fit).

No gradient step, calibration forwards only: the teacher is run once over the samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from tailor.prune.pruning import find_layers, removed_block

# Ridge on the normal equations, relative to their mean diagonal: the hidden states of a
# few thousand tokens leave some directions barely seen.
RIDGE = 1e-3


@dataclass(frozen=True)
class LinearMapFit:
    """What was fitted, and how much of the block's effect it carries on the calibration tokens."""

    layer: int
    """The student's decoder layer whose MLP now carries the map (the last one before the cut)."""
    replaced: tuple[int, ...]
    """The original's layers the map stands for."""
    tokens: int
    explained: float
    """1 - (squared error of the residual stream after the cut, with the map) / (the same without it)."""

    def to_dict(self) -> dict:
        return {**asdict(self), "replaced": list(self.replaced)}


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _post_norm(layer: nn.Module) -> nn.Module | None:
    """The norm the MLP's output passes through before joining the residual stream (Gemma), if any."""
    return getattr(layer, "post_feedforward_layernorm", None)


def _gain(norm: nn.Module, size: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-channel gain g, what the weight adds to it): read off the module by feeding it
    a vector of RMS 1, so Gemma's ``1 + weight`` and Llama's ``weight`` both come out right."""
    with torch.no_grad():
        g = norm(torch.ones(1, size, dtype=norm.weight.dtype)).double().squeeze(0) * (1.0 + _eps(norm)) ** 0.5
    return g.to(dtype), (g - norm.weight.double()).to(dtype)


def _eps(norm: nn.Module) -> float:
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))


def _unit(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def fit_linear_map(
    student: nn.Module, teacher: nn.Module, samples: dict[str, torch.Tensor], batch_size: int = 8
) -> LinearMapFit:
    """Fit the map on the teacher's activations over ``samples`` (token ids and mask) and fold
    it into ``student`` in place. The student is the teacher without one contiguous block of
    layers, with at least one layer before the block."""
    removed = removed_block(student, teacher, "distill.linear_map", after_first=True)
    k, last = removed[0] - 1, removed[-1]
    t_layers, s_layer = find_layers(teacher)[2], find_layers(student)[2][k]
    norm = _post_norm(t_layers[k])
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        t_layers[k].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("D", o)),
        t_layers[k].register_forward_hook(lambda m, i, o: seen.__setitem__("Yk", _output(o))),
        t_layers[last].register_forward_hook(lambda m, i, o: seen.__setitem__("Yn", _output(o))),
    ]
    was_training = teacher.training
    teacher.eval()
    D_all, delta_all = [], []
    try:
        for b in range(0, samples["input_ids"].shape[0], batch_size):
            ids, mask = samples["input_ids"][b : b + batch_size], samples["attention_mask"][b : b + batch_size]
            teacher(input_ids=ids.to(teacher.device), attention_mask=mask.to(teacher.device))
            keep = mask.bool().to(teacher.device)
            D_all.append(seen["D"][keep].float())
            # What the block adds to the residual stream: all a pruned model misses.
            delta_all.append((seen["Yn"][keep] - seen["Yk"][keep]).float())
    finally:
        for h in hooks:
            h.remove()
        teacher.train(was_training)
    D, delta = torch.cat(D_all).double(), torch.cat(delta_all).double()
    M = _contribution(D, norm)
    # What the MLP's contribution must be for the residual stream to match the block's output.
    tgt = M + delta
    xtx, xty = M.T @ M, M.T @ tgt
    T = torch.linalg.solve(xtx + RIDGE * xtx.diagonal().mean() * torch.eye(len(xtx), dtype=xtx.dtype), xty)

    down = s_layer.mlp.down_proj
    if norm is None:
        A = T
    else:
        g, offset = _gain(norm, D.shape[1])
        A = torch.diag(g) @ T @ torch.diag(1.0 / g)
    down.weight.copy_((A.T @ down.weight.double()).to(down.weight.dtype))
    if norm is not None:
        u = _unit(D @ A, _eps(norm))
        gain = (u * tgt).sum(0) / (u * u).sum(0).clamp_min(torch.finfo(torch.float64).tiny)
        s_norm = _post_norm(s_layer)
        s_norm.weight.copy_((gain - offset).to(s_norm.weight.dtype))
    after = (tgt - _contribution(D @ A, _post_norm(s_layer))).pow(2).sum().item()
    return LinearMapFit(
        layer=k, replaced=tuple(removed), tokens=len(D), explained=1.0 - after / delta.pow(2).sum().item()
    )


def _contribution(D: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """What the MLP adds to the residual stream for down-projection outputs ``D`` (float64)."""
    if norm is None:
        return D
    g, _ = _gain(norm, D.shape[1])
    return _unit(D, _eps(norm)) * g
