"""Depth pruning: remove whole decoder layers and keep the config consistent."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

from tailor.common.layout import WorkDir
from tailor.config.settings import TailorError
from tailor.store.checkpoint import (
    CheckpointRef,
    code_identity,
    count_parameters,
    load_model,
    save_model,
    stable_hash,
    write_checkpoint,
)

# Attribute paths under which known architectures keep their decoder layer list.
_LAYER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.language_model.layers",
)


class PruneError(TailorError, ValueError):
    """The requested layers cannot be removed from this model."""


def find_layers(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, layer list) of the decoder stack."""
    for path in _LAYER_PATHS:
        parent, *rest = path.rsplit(".", 1)
        node = model
        try:
            for attr in parent.split("."):
                node = getattr(node, attr)
            layers = getattr(node, rest[0])
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList):
            return node, rest[0], layers
    raise PruneError(
        f"cannot find the decoder layer list of {type(model).__name__}; "
        f"supported attribute paths: {', '.join(_LAYER_PATHS)}"
    )


def resolve_indices(num_layers: int, remove_last: int, indices: Sequence[int] | None) -> list[int]:
    """Validated, sorted layer indices to remove (explicit ``indices`` win over ``remove_last``)."""
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < num_layers]
        if bad:
            raise PruneError(f"prune.indices {bad} out of range; allowed: 0..{num_layers - 1}")
        if len(set(indices)) != len(indices):
            raise PruneError(f"prune.indices has duplicates: {list(indices)}")
        if len(indices) >= num_layers:
            raise PruneError(f"prune.indices would remove all {num_layers} layers; keep at least one")
        return sorted(indices)
    if not 1 <= remove_last < num_layers:
        raise PruneError(
            f"prune.num_layers={remove_last} not allowed for a {num_layers}-layer model; allowed: 1..{num_layers - 1}"
        )
    return list(range(num_layers - remove_last, num_layers))


def prune_layers(model: nn.Module, remove: Sequence[int]) -> nn.Module:
    """Remove decoder layers in place and return the model.

    Keeps ``num_hidden_layers``, every per-layer config list (Gemma3's
    ``layer_types`` and the like) and each attention module's ``layer_idx``
    consistent, so the KV cache indexes the right slots and the model saves and
    reloads with ``AutoModelForCausalLM``.
    """
    parent, attr, layers = find_layers(model)
    n = len(layers)
    remove_set = set(resolve_indices(n, 1, list(remove)))
    keep = [i for i in range(n) if i not in remove_set]
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))

    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(config, key, type(value)(value[i] for i in keep))
    config.num_hidden_layers = len(keep)
    _renumber(getattr(parent, attr))
    return model


def prune_checkpoint(base: CheckpointRef, remove: Sequence[int], work_dir: str) -> tuple[CheckpointRef, int, int]:
    """The base checkpoint without the ``remove`` layers, saved once under ``work_dir``
    (named by base fingerprint, layers and the code's versions); returns (ref, parameters before, after)."""
    model, tokenizer = load_model(base.verify())
    before = count_parameters(model)
    prune_layers(model, remove)
    name = f"pruned-{stable_hash(base.fingerprint, sorted(remove), code_identity())}"
    ref = write_checkpoint(WorkDir(work_dir).checkpoints / name, lambda tmp: save_model(model, tokenizer, tmp))
    return ref, before, count_parameters(model)


def insert_layer(model: nn.Module, index: int, layer: nn.Module, layer_config: dict | None = None) -> nn.Module:
    """Insert ``layer`` as decoder layer ``index`` in place and return the model.

    ``layer_config`` holds the new layer's entry of every per-layer config list (Gemma3's
    ``layer_types``: the attention pattern it computes with); the rest is kept consistent
    as ``prune_layers`` keeps it.
    """
    parent, attr, layers = find_layers(model)
    n = len(layers)
    if not 0 <= index <= n:
        raise PruneError(f"cannot insert a decoder layer at {index}; allowed: 0..{n}")
    config = model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            if not layer_config or key not in layer_config:
                raise PruneError(f"inserting a decoder layer needs its entry of config.{key}")
            items = list(value)
            items.insert(index, layer_config[key])
            setattr(config, key, type(value)(items))
    new = list(layers)
    new.insert(index, layer)
    setattr(parent, attr, nn.ModuleList(new))
    config.num_hidden_layers = n + 1
    _renumber(getattr(parent, attr))
    return model


def _renumber(layers: nn.ModuleList) -> None:
    for new_idx, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx


def equal_weights(a: nn.Module, b: nn.Module, as_second: bool = False) -> bool:
    """The two modules hold the same tensors under the same names, value for value
    (``as_second``: ``a``'s values rounded to ``b``'s dtypes)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and torch.equal(sa[k].to(sb[k].dtype) if as_second else sa[k], sb[k]) for k in sa
    )


def removed_layers(pruned: nn.Module, original: nn.Module) -> list[int]:
    """The original's decoder layers that ``pruned`` no longer holds, found by their weights."""
    kept, j = [], 0
    theirs = find_layers(original)[2]
    for layer in find_layers(pruned)[2]:
        while j < len(theirs) and not equal_weights(layer, theirs[j]):
            j += 1
        if j == len(theirs):
            raise PruneError(
                "a decoder layer of the pruned model is not among the original's (was it trained?): "
                "the removed block cannot be located"
            )
        kept.append(j)
        j += 1
    return [i for i in range(len(theirs)) if i not in kept]


def removed_block(pruned: nn.Module, original: nn.Module, setting: str, after_first: bool = False) -> list[int]:
    """The one contiguous block of ``original``'s layers that ``pruned`` lacks (``removed_layers``),
    or a ``PruneError`` naming ``setting``, what needs it; ``after_first``: the block must keep layer 0."""
    removed = removed_layers(pruned, original)
    contiguous = bool(removed) and removed == list(range(removed[0], removed[-1] + 1))
    if not contiguous or (after_first and removed[0] == 0):
        raise PruneError(
            f"{setting} needs one contiguous removed block{' after the first layer' if after_first else ''}; "
            f"layers {removed} were removed (use prune.strategy last or angular, or indices of one block)"
        )
    return removed


def replace_removed_block(pruned: nn.Module, original: nn.Module) -> int:
    """Put one decoder layer where ``pruned`` lost a contiguous block of ``original``'s (LLM-Streamline).

    The new layer starts as a copy of the block's first layer, which reads the very state the
    block read; training it to produce the block's output is the caller's. Returns its index.
    """
    first = removed_block(pruned, original, "distill.replacement_layer")[0]
    n = len(find_layers(original)[2])
    per_layer = {
        key: value[first]
        for key, value in vars(original.config).items()
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures"
    }
    insert_layer(pruned, first, copy.deepcopy(find_layers(original)[2][first]), per_layer)
    return first
