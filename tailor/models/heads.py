"""A causal LM's output head applied to hidden states, outside its forward.

Evaluation, perplexity and the distillation losses apply the head a chunk of tokens at a
time (Gemma's 262,144-entry vocabulary makes full logits the largest tensor of a step), so
they need the head exactly as the model's own forward applies it.
"""

from __future__ import annotations

import torch


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output head (with Gemma-style final soft-capping when configured)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
