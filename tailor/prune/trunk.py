"""Two models that share their first decoder layers: run the shared trunk once, branch into each tail.

Removing the last N layers leaves layers 0..L-N-1 untouched, and a student that trains only
its last k layers keeps its first L-N-k as they were: up to that depth the student's hidden
states *are* the teacher's. Sharing is checked on the weights (``shared_prefix``), never
assumed from how a model was made. ``tail_hidden`` runs a decoder from a hidden state at a
given depth to its final norm, with the same masks and rotary embeddings its full forward
builds, so the result equals the full forward's to the bit.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from tailor.prune.pruning import equal_weights, find_layers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return find_layers(model)[2]


def shared_prefix(student: nn.Module, teacher: nn.Module) -> int:
    """How many leading decoder layers (and the input embedding) the student holds with the teacher's weights.

    A teacher that stores its matmul weights in bfloat16 (``to_bfloat16_matmuls``) shares a
    layer whose student weights round to its own. Zero when the input embeddings differ: the
    trunk then starts from different states.
    """
    if not equal_weights(student.get_input_embeddings(), teacher.get_input_embeddings(), as_second=True):
        return 0
    shared = 0
    for ls, lt in zip(decoder_layers(student), decoder_layers(teacher)):
        if not equal_weights(ls, lt, as_second=True):
            break
        shared += 1
    return shared


def tail_model(model: nn.Module, start: int) -> nn.Module:
    """A view of ``model``'s decoder that runs layers ``start..`` and the final norm from ``inputs_embeds``.

    It shares every module (and so every weight and gradient) with ``model``; only its layer
    list and the per-layer lists of its config are cut, so each layer keeps its attention type.
    """
    decoder = model.get_decoder()
    layers = decoder_layers(model)
    if not 0 <= start <= len(layers):
        raise ValueError(f"tail start {start} outside 0..{len(layers)}")
    tail = copy.copy(decoder)
    tail._modules = dict(decoder._modules)
    tail.layers = nn.ModuleList(list(layers)[start:])
    config = copy.copy(decoder.config)
    n = len(layers)
    for key, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == n and key != "architectures":
            setattr(config, key, type(value)(value[start:]))
    config.num_hidden_layers = n - start
    tail.config = config
    return tail


def tail_hidden(
    tail: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The final normed hidden states of ``tail`` (a ``tail_model``) run from ``hidden``."""
    return tail(
        inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state


def hidden_states_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | dict[str, torch.Tensor],
    depths: tuple[int, ...],
    position_ids: torch.Tensor | None = None,
) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({depth: hidden state entering layer ``depth``}, final normed hidden) from one forward.

    Depth 0 is the scaled input embedding; depth d > 0 is layer d-1's output.
    """
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for d in depths:
        if d == 0:
            hooks.append(
                model.get_input_embeddings().register_forward_hook(
                    lambda m, args, out, d=d: captured.__setitem__(d, out)
                )
            )
        else:
            hooks.append(
                layers[d - 1].register_forward_hook(
                    lambda m, args, out, d=d: captured.__setitem__(d, out[0] if isinstance(out, tuple) else out)
                )
            )
    try:
        final = model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    return captured, final


# Config fields that differ between models sharing a trunk without changing what the trunk computes.
_PER_MODEL_CONFIG = {"num_hidden_layers", "layer_types", "_name_or_path", "architectures", "transformers_version"}


def same_trunk_settings(a, b) -> bool:
    """Two configs that agree on everything but their layer count and per-layer lists (vocabulary,
    widths, attention windows, rotary tables): the precondition for sharing any layers."""

    def shaping(config) -> dict:
        return {k: v for k, v in config.to_dict().items() if k not in _PER_MODEL_CONFIG}

    return shaping(a) == shaping(b)


def shared_depths(models: list[nn.Module]) -> list[int]:
    """Per model, the leading layers it shares with ``models[0]`` (0 for the first itself): the
    pruned model may share all its layers with the original, a distilled one that trained its
    last layers fewer. Checked on the weights and the settings, never assumed."""
    first = models[0]
    return [0] + [shared_prefix(m, first) if same_trunk_settings(first.config, m.config) else 0 for m in models[1:]]


def final_hidden_states(
    models: list[nn.Module],
    depths: list[int],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | dict[str, torch.Tensor],
    position_ids: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Each model's final normed hidden states for one batch, every shared layer run once: the
    first model runs its whole forward, and model j > 0 runs its own layers from the first's
    hidden state after ``depths[j]`` layers (``shared_depths``; 0: its whole forward)."""
    wanted = tuple(sorted({d for d in depths[1:] if d > 0}))
    captured, final = hidden_states_at(models[0], input_ids, attention_mask, wanted, position_ids)
    hidden = [final]
    for model, depth in zip(models[1:], depths[1:]):
        if depth == 0:
            hidden.append(
                model.get_decoder()(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
                ).last_hidden_state
            )
        else:
            hidden.append(tail_hidden(tail_model(model, depth), captured[depth], attention_mask, position_ids))
    return hidden
