"""Where distillation computes in bfloat16: the teacher's matmuls, and optionally the student's.

The teacher is never trained, so its precision only has to keep the loss it feeds close
to float32's. With ``bfloat16``, its linear and embedding weights are stored in bfloat16
(half their memory) and its matmuls run under bfloat16 autocast, while the residual
stream, the norms and the embedding scale stay float32, and the input embedding is
looked up in float32 rows kept for the tokens the teacher will read.
``benchmarks/kd_step.py`` prints how far that moves the book's loss of one batch.

``auto`` is decided by speed, not by support: native bfloat16 says nothing of its speed
(on CPUs with AVX512-BF16 but no AMX, gemma-3-270m's bfloat16 matmuls ran at half float32's
rate on one machine and at several times it on another, whose float32 BLAS was slow), so
``bfloat16_is_faster`` times both on the shapes that dominate distilling gemma-3-270m and
keeps the answer per machine in a probe folder (``WorkDir.probes``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
import torch.nn.functional as F

from tailor.store.checkpoint import stable_hash, write_file_atomically

# (tokens, in, out) of the matmuls that dominate a distillation step of gemma-3-270m (hidden
# size 640): an MLP projection of half a batch of 8 x 128 tokens, and a chunk of the output head.
PROBE_SHAPES = ((512, 640, 2048), (256, 640, 8192))
# Autocast pays for casts around every matmul and bfloat16 rounds the loss: a marginal win is none.
PROBE_MIN_SPEEDUP = 1.2
PROBE_RULE = f"bfloat16 when its matmuls are at least {PROBE_MIN_SPEEDUP:g}x float32's GFLOP/s on every probed shape"
NO_BFLOAT16_RULE = "float32: the device has no native bfloat16 matmuls"
_PROBE_REPEATS = 5
_PROBE_BUDGET_S = 0.6  # timed repeats stop here (after at least two): the probe stays well under 2 s
_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


def fast_bfloat16(device: str | torch.device) -> bool:
    """The device multiplies bfloat16 matrices natively (AVX512-BF16 / AMX on CPU; CUDA sm80+).

    Supported, not necessarily faster than float32: ``bfloat16_is_faster`` says that.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@dataclass(frozen=True)
class PrecisionProbe:
    """What ``auto`` precision chose on one machine, and the matmul rates it chose by."""

    device: str
    """The device as probed: model name and the flags that decide bfloat16 speed."""
    torch_version: str
    threads: int
    supported: bool
    """Whether the device multiplies bfloat16 natively; without it nothing is timed."""
    gflops: dict[str, dict[str, float]]
    """Per probed shape ``"MxKxN"``: ``{"float32": GFLOP/s, "bfloat16": GFLOP/s}``."""
    choice: str
    """``bfloat16`` or ``float32``: what ``auto`` becomes."""
    rule: str
    seconds: float
    """How long the timing took (0 when nothing was timed)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PrecisionProbe:
        """The probe a ``to_dict`` wrote; ``ValueError`` for anything else."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(names):
            raise ValueError("not a precision probe")
        gflops = data["gflops"]
        if not isinstance(gflops, dict) or not all(
            isinstance(rates, dict)
            and sorted(rates) == ["bfloat16", "float32"]
            and all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in rates.values())
            for rates in gflops.values()
        ):
            raise ValueError("not a precision probe: bad GFLOP/s figures")
        if not (
            all(isinstance(data[f], str) for f in ("device", "torch_version", "choice", "rule"))
            and isinstance(data["threads"], int)
            and isinstance(data["supported"], bool)
            and isinstance(data["seconds"], (int, float))
        ):
            raise ValueError("not a precision probe: a field of the wrong type")
        return cls(**{**data, "gflops": {s: {d: float(r) for d, r in v.items()} for s, v in gflops.items()}})

    def describe(self) -> str:
        """One line: the choice and the figures behind it."""
        if not self.supported:
            return f"{self.choice} on {self.device} ({self.rule})"
        rates = ", ".join(
            f"{shape}: {r['bfloat16']:.0f} vs {r['float32']:.0f} GFLOP/s ({r['bfloat16'] / r['float32']:.2f}x)"
            for shape, r in self.gflops.items()
        )
        return (
            f"{self.choice} on {self.device}, {self.threads} threads, torch {self.torch_version}: "
            f"bfloat16 vs float32 matmuls {rates} (rule: {self.rule})"
        )


# Per process: once ``auto`` has resolved, every later key and setting of this run agrees with it.
_PROBES: dict[str, PrecisionProbe] = {}


def bfloat16_is_faster(device: str | torch.device, probe_dir: Path | None = None) -> PrecisionProbe:
    """Whether bfloat16 matmuls beat float32 ones on ``device`` by ``PROBE_RULE``, timed once per machine.

    The answer is kept in ``probe_dir`` (one JSON file per machine key: device model and
    bfloat16 flags, torch version, thread count, shapes and rule), so later processes on the
    same machine reuse it; a file that does not parse or names another key is probed again
    and replaced. Without ``probe_dir`` it is kept for this process only. A device without
    native bfloat16 gets float32 without timing.
    """
    device = torch.device(device)
    key = probe_key(device)
    if not fast_bfloat16(device):
        return PrecisionProbe(
            key["device"], torch.__version__, key["threads"], False, {}, "float32", NO_BFLOAT16_RULE, 0.0
        )
    name = stable_hash(key)
    path = Path(probe_dir) / f"precision-{name}.json" if probe_dir is not None else None
    stored = _read_probe(path, key) if path is not None else None
    probe = _PROBES.get(name) or stored or _measure(device, key)
    _PROBES[name] = probe
    if path is not None and stored is None:
        text = json.dumps({"key": key, "probe": probe.to_dict()}, indent=1) + "\n"
        write_file_atomically(path, lambda tmp: tmp.write_text(text))
    return probe


def probe_key(device: str | torch.device) -> dict:
    """What makes a probe's answer valid: the device, its bfloat16 flags, torch, threads, shapes and rule."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        model, flags = torch.cuda.get_device_name(index), [f"sm_{major}{minor}"]
    elif device.type == "cpu":
        model, flags = _cpu_model_and_flags()
    else:
        model, flags = device.type, []
    return {
        "device": f"{device.type}: {model}" + (f" ({' '.join(flags)})" if flags else ""),
        "flags": flags,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shapes": [list(s) for s in PROBE_SHAPES],
        "rule": PROBE_RULE,
    }


@functools.cache
def _cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, []
    for line in text.splitlines():
        field, _, value = line.partition(":")
        if field.strip() == "model name" and value.strip():
            model = value.strip()
        elif field.strip() == "flags":
            flags = set(value.split())
            break  # every core reports the same
    return model, sorted(flags & set(_CPU_FLAGS))


def _read_probe(path: Path, key: dict) -> PrecisionProbe | None:
    """The probe stored at ``path`` for exactly ``key``; None for a missing, corrupt or foreign file."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("key") != key:
            return None
        probe = PrecisionProbe.from_dict(data.get("probe"))
    except (OSError, ValueError, TypeError):
        return None
    shapes = {_shape_name(s) for s in PROBE_SHAPES}
    as_keyed = (probe.device, probe.torch_version, probe.threads, probe.rule) == (
        key["device"],
        key["torch"],
        key["threads"],
        key["rule"],
    )
    # A hand-edited or copied file could name a choice its own figures do not support.
    if not (as_keyed and probe.supported and set(probe.gflops) == shapes and probe.choice == _choose(probe.gflops)):
        return None
    return probe


def _shape_name(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def _choose(gflops: dict[str, dict[str, float]]) -> str:
    faster = all(r["bfloat16"] >= PROBE_MIN_SPEEDUP * r["float32"] for r in gflops.values())
    return "bfloat16" if faster else "float32"


def _measure(device: torch.device, key: dict) -> PrecisionProbe:
    started = time.perf_counter()
    gflops = _matmul_rates(device)
    seconds = time.perf_counter() - started
    return PrecisionProbe(
        key["device"], torch.__version__, key["threads"], True, gflops, _choose(gflops), PROBE_RULE, seconds
    )


def _matmul_rates(device: torch.device) -> dict[str, dict[str, float]]:
    """GFLOP/s of float32 and bfloat16 matmuls of every ``PROBE_SHAPES`` shape on ``device``: the timing."""
    generator = torch.Generator().manual_seed(0)
    operands = {}
    for shape in PROBE_SHAPES:
        m, k, n = shape
        x, w = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
        for dtype in (torch.float32, torch.bfloat16):
            operands[shape, dtype] = (x.to(device, dtype), w.to(device, dtype))  # laid out as nn.Linear's
    calls = 1 if device.type == "cpu" else 20  # one GPU matmul is too short to time
    best = dict.fromkeys(operands, math.inf)
    started = time.perf_counter()
    with torch.no_grad():
        for x, w in operands.values():
            F.linear(x, w)  # oneDNN and cuBLAS pick and build their kernels on first use
        for repeat in range(_PROBE_REPEATS):
            # Interleaved, so a neighbour's load falls on both precisions alike; the minimum is
            # the run least disturbed by it.
            for op, (x, w) in operands.items():
                _synchronize(device)
                start = time.perf_counter()
                for _ in range(calls):
                    F.linear(x, w)
                _synchronize(device)
                best[op] = min(best[op], (time.perf_counter() - start) / calls)
            if repeat >= 1 and time.perf_counter() - started > _PROBE_BUDGET_S:
                break
    return {
        _shape_name(shape): {
            "float32": 2 * math.prod(shape) / best[shape, torch.float32] / 1e9,
            "bfloat16": 2 * math.prod(shape) / best[shape, torch.bfloat16] / 1e9,
        }
        for shape in PROBE_SHAPES
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_teacher_dtype(name: str, device: str | torch.device, probe_dir: Path | None = None) -> str:
    """``auto`` becomes what ``bfloat16_is_faster`` chooses on ``device``; float32 and bfloat16 stay."""
    if name != "auto":
        return name
    return bfloat16_is_faster(device, probe_dir).choice


def resolve_bf16_autocast(value: bool | str, device: str | torch.device, probe_dir: Path | None = None) -> bool:
    """The student's bfloat16 autocast on ``device``: ``auto`` is on where ``bfloat16_is_faster`` chooses it."""
    if value != "auto":
        return bool(value)
    return bfloat16_is_faster(device, probe_dir).choice == "bfloat16"


def teacher_numerics(name: str, device: str | torch.device, probe_dir: Path | None = None) -> str:
    """What a teacher of precision ``name`` computes in on ``device`` (for cache keys and reports)."""
    dtype = resolve_teacher_dtype(name, device, probe_dir)
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


def load_teacher(ref, dtype: str, token_ids: torch.Tensor, device: str = "cpu", probe_dir: Path | None = None):
    """The teacher in eval mode without gradients, for the samples whose ``token_ids`` it will read.

    ``dtype`` float32, bfloat16 or auto (see ``to_bfloat16_matmuls`` and ``bfloat16_is_faster``).
    """
    from tailor.store.checkpoint import load_model

    teacher = load_model(ref, device=device)[0]
    teacher.eval().requires_grad_(False)
    if resolve_teacher_dtype(dtype, device, probe_dir) == "bfloat16":
        to_bfloat16_matmuls(teacher, token_ids)
    return teacher
