"""Perplexity of a causal LM on fixed samples: the held-out slice of the distillation corpus.

Thousands of scored tokens make it a low-noise measure beside the benchmark accuracies,
cheap enough to take during training (the healing curve).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tailor.data.tokenised import TokensRef
from tailor.models.heads import output_logits
from tailor.models.precision import bfloat16_autocast, bfloat16_is_faster
from tailor.store.checkpoint import CheckpointRef, load_model


@torch.no_grad()
def sample_nll(model, samples: dict[str, torch.Tensor], batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per sample: summed next-token negative log-likelihood and the number of scored tokens.

    Matmuls run in bfloat16 where the device's measured probe finds it faster than float32
    (``bfloat16_is_faster``; the 262k-row head is most of the cost), softmax and sums in
    float32. Every model compared is scored the same
    way, so comparisons between them are like for like.
    """
    was_training = model.training
    model.eval()
    bf16 = bfloat16_is_faster(model.device).choice == "bfloat16"
    ids, mask = samples["input_ids"], samples["attention_mask"]
    sums: list[float] = []
    counts: list[int] = []
    try:
        for start in range(0, ids.shape[0], batch_size):
            b_ids = ids[start : start + batch_size].to(model.device)
            b_mask = mask[start : start + batch_size].to(model.device)
            with bfloat16_autocast(bf16, model.device):
                hidden = model.get_decoder()(input_ids=b_ids, attention_mask=b_mask, use_cache=False).last_hidden_state
            for row, row_ids, row_mask in zip(hidden, b_ids, b_mask):
                n = int(row_mask.sum())
                # One sequence through the head at a time: [seq, V] logits, never [B, seq, V].
                with bfloat16_autocast(bf16, model.device):
                    logits = output_logits(model, row[: n - 1]).float()
                sums.append(float(F.cross_entropy(logits, row_ids[1:n], reduction="sum")))
                counts.append(n - 1)
    finally:
        model.train(was_training)
    return sums, counts


def heldout_perplexity(model, heldout: dict[str, dict[str, torch.Tensor]]) -> dict:
    """{"perplexity": pooled over every held-out token, "sources": {source: perplexity}, "tokens": n}."""
    per_source, total_nll, total_tokens = {}, 0.0, 0
    for source, samples in heldout.items():
        sums, counts = sample_nll(model, samples)
        per_source[source] = math.exp(sum(sums) / sum(counts))
        total_nll += sum(sums)
        total_tokens += sum(counts)
    return {
        "perplexity": math.exp(total_nll / total_tokens) if total_tokens else None,
        "sources": per_source,
        "tokens": total_tokens,
    }


def checkpoint_heldout_perplexity(ref: CheckpointRef, heldout: TokensRef) -> dict:
    """``heldout_perplexity`` of a saved checkpoint on the recipe's held-out corpus slice."""
    return heldout_perplexity(load_model(ref.verify())[0], heldout.per_source())
