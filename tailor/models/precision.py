"""Where distillation computes in bfloat16: the teacher's matmuls, and optionally the student's.

The teacher is never trained, so its precision only has to keep the loss it feeds close
to float32's. With ``bfloat16``, its linear and embedding weights are stored in bfloat16
(half their memory) and its matmuls run under bfloat16 autocast, while the residual
stream, the norms and the embedding scale stay float32, and the input embedding is
looked up in float32 rows kept for the tokens the teacher will read.
``benchmarks/kd_step.py`` prints how far that moves the book's loss of one batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.nn.functional as F


def fast_bfloat16(device: str | torch.device) -> bool:
    """The device multiplies bfloat16 matrices natively (AVX512-BF16 / AMX on CPU; CUDA sm80+)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_teacher_dtype(name: str, device: str | torch.device) -> str:
    """``auto`` becomes bfloat16 where the device supports it natively, float32 elsewhere."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bfloat16(device) else "float32"


def resolve_bf16_autocast(value: bool | str, device: str | torch.device) -> bool:
    """The student's bfloat16 autocast setting on ``device``: ``auto`` is on where bfloat16 is native."""
    return fast_bfloat16(device) if value == "auto" else bool(value)


def teacher_numerics(name: str, device: str | torch.device) -> str:
    """What a teacher of precision ``name`` computes in on ``device`` (for cache keys and reports)."""
    dtype = resolve_teacher_dtype(name, device)
    return "bfloat16 matmuls, float32 embedding rows" if dtype == "bfloat16" else dtype


def to_bfloat16_matmuls(model, token_ids: torch.Tensor) -> None:
    """Store linear and embedding weights in bfloat16; norms and buffers stay float32.

    Run it through ``final_hidden`` (bfloat16 autocast). The input embedding's output is
    recomputed in float32 from float32 copies of the rows of ``token_ids`` (the tokens the
    teacher will be given; any other token is refused), with a Gemma-style ``embed_scale``
    applied in float32, so the residual stream that every layer adds to starts exact and
    stays float32: a lookup of bfloat16-rounded rows, scaled by sqrt(hidden size) and
    carried through every layer, was the largest part of the loss drift on gemma-3-270m.
    """
    embeddings = model.get_input_embeddings()
    kept = torch.unique(token_ids.to(embeddings.weight.device))
    rows = embeddings.weight.detach()[kept].float()  # fancy indexing copies: the rows own their memory
    position = torch.full((embeddings.weight.shape[0],), -1, dtype=torch.long, device=kept.device)
    position[kept] = torch.arange(len(kept), device=kept.device)
    for module in model.modules():
        matmul = isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        for param in module.parameters(recurse=False):
            # Copying the float32 rest too drops the last views of a memory-mapped checkpoint
            # file, whose pages would otherwise stay resident (1 GiB more for gemma-3-270m).
            param.data = param.data.to(torch.bfloat16) if matmul else param.data.clone()

    def float32_lookup(module, args, output):
        where = position[args[0]]
        if bool((where < 0).any()):
            raise ValueError(
                "the bfloat16 teacher keeps float32 embedding rows only for the distillation "
                "samples' tokens, and was given another token"
            )
        out = F.embedding(where, rows)
        scale = getattr(module, "embed_scale", None)
        return out * scale.float() if scale is not None else out

    embeddings.register_forward_hook(float32_lookup)


def has_bfloat16_matmuls(model) -> bool:
    return model.get_input_embeddings().weight.dtype == torch.bfloat16


def bfloat16_autocast(enabled: bool, device: str | torch.device) -> ContextManager:
    """bfloat16 autocast on the device's type when ``enabled``, else nothing."""
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    """The decoder's last hidden states (the output head's input), in float32.

    A model prepared by ``to_bfloat16_matmuls`` always runs under bfloat16 autocast;
    ``autocast`` asks for it on a float32 model (the student's optional mixed precision).
    """
    with bfloat16_autocast(autocast or has_bfloat16_matmuls(model), input_ids.device):
        hidden = model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
    return hidden.float()


def load_teacher(ref, dtype: str, token_ids: torch.Tensor, device: str = "cpu"):
    """The teacher in eval mode without gradients, for the samples whose ``token_ids`` it will read.

    ``dtype`` float32, bfloat16 or auto (see ``to_bfloat16_matmuls``).
    """
    from tailor.store.checkpoint import load_model

    teacher = load_model(ref, device=device)[0]
    teacher.eval().requires_grad_(False)
    if resolve_teacher_dtype(dtype, device) == "bfloat16":
        to_bfloat16_matmuls(teacher, token_ids)
    return teacher
