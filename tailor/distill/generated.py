"""Text the teacher writes itself: an unlimited, offline corpus in the teacher's own distribution.

The offline corpus files are small and off the teacher's domain; sampled text is neither,
and matching the teacher on it asks the student for exactly what the teacher does. The
teacher samples ``count`` sequences of ``seq_len`` tokens from BOS (temperature and
nucleus top-p from ``GenerateConfig``), ``batch_size`` at a time. Batch ``b`` is sampled
with the seed ``seed + b`` and written as its own shard (write, then rename), so a killed
run continues at the first missing shard and ends with the tokens an uninterrupted run
writes. The folder is named by everything the text depends on (teacher weights, settings,
count, length); the finished set is one safetensors file read like any tokenised set.

Sequences end at the teacher's end-of-text token (kept), padded after it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailor.common.layout import WorkDir
from tailor.config.settings import TEACHER_SOURCE, GenerateConfig, TailorConfig
from tailor.data.corpus import source_share
from tailor.data.tokenised import TokensRef
from tailor.models.precision import bfloat16_autocast, resolve_teacher_dtype
from tailor.store.checkpoint import CheckpointRef, load_model, stable_hash, write_file_atomically
from tailor.store.digested import sha256_file

GENERATED_FILE = "teacher_text.safetensors"
_NUCLEUS_CANDIDATES = 4096


def generated_folder(
    teacher: CheckpointRef, cfg: GenerateConfig, count: int, seq_len: int, root: Path, probe_dir: Path | None = None
) -> Path:
    """Named by what the text depends on, the precision as it resolves on this machine included
    (``probe_dir`` as in ``bfloat16_is_faster``)."""
    return Path(root) / stable_hash(
        teacher.fingerprint, cfg.model_dump(), count, seq_len, resolve_teacher_dtype(cfg.dtype, "cpu", probe_dir)
    )


def generate_corpus(
    teacher_ref: CheckpointRef,
    cfg: GenerateConfig,
    count: int,
    seq_len: int,
    root: Path,
    on_batch=None,
    probe_dir: Path | None = None,
) -> TokensRef:
    """``count`` teacher-sampled sequences of ``seq_len`` tokens (BOS first) as a ``TokensRef``; resumable."""
    folder = generated_folder(teacher_ref, cfg, count, seq_len, root, probe_dir)
    final = folder / GENERATED_FILE
    if final.exists():
        return TokensRef(str(final), sha256_file(final))
    model, tokenizer = load_model(teacher_ref)
    model.eval().requires_grad_(False)
    batches = -(-count // cfg.batch_size)
    bf16 = resolve_teacher_dtype(cfg.dtype, "cpu", probe_dir) == "bfloat16"
    for b in range(batches):
        shard = folder / f"shard-{b:05d}.safetensors"
        if not shard.exists():
            rows = min(cfg.batch_size, count - b * cfg.batch_size)
            with bfloat16_autocast(bf16, "cpu"):
                ids, mask = sample_batch(model, tokenizer, rows, seq_len, cfg, seed=cfg.seed + b)
            write_file_atomically(
                shard,
                lambda tmp, i=ids, m=mask: save_file(
                    {"input_ids": i.contiguous(), "attention_mask": m.contiguous()}, str(tmp)
                ),
            )
        if on_batch is not None:
            on_batch(b + 1, batches)
    shards = [load_file(str(folder / f"shard-{b:05d}.safetensors")) for b in range(batches)]
    merged = {k: torch.cat([s[k] for s in shards]) for k in ("input_ids", "attention_mask")}
    write_file_atomically(final, lambda tmp: save_file(merged, str(tmp)))
    for b in range(batches):
        (folder / f"shard-{b:05d}.safetensors").unlink(missing_ok=True)
    return TokensRef(str(final), sha256_file(final))


@torch.no_grad()
def sample_batch(
    model, tokenizer, rows: int, seq_len: int, cfg: GenerateConfig, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, seq_len] token ids and attention mask: BOS, then the teacher's samples up to its end token."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise ValueError("sampling the teacher's text needs a tokenizer with a BOS token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, 1), bos, dtype=torch.long)
    done = torch.zeros(rows, dtype=torch.bool)
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    logits = out.logits[:, -1]
    columns = [ids]
    for _ in range(seq_len - 1):
        nxt = _sample(logits, cfg.temperature, cfg.top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        columns.append(nxt[:, None])
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        out = model(input_ids=nxt[:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    tokens = torch.cat(columns, dim=1)
    mask = _mask_through_end(tokens, eos)
    width = tokens.shape[1]
    if width < seq_len:
        tokens = torch.cat([tokens, torch.full((rows, seq_len - width), pad, dtype=torch.long)], dim=1)
        mask = torch.cat([mask, torch.zeros((rows, seq_len - width), dtype=torch.long)], dim=1)
    return tokens.masked_fill(mask == 0, pad), mask


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from softmax(logits / T), restricted to the smallest set holding ``top_p`` of the mass."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        # The nucleus almost always lies within the most likely few thousand tokens: a partial
        # top-k is much cheaper than sorting 262k entries per row, and exactly as good when its
        # mass reaches top_p (else the full sort).
        sorted_probs, order = probs.topk(min(_NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)
        if bool((sorted_probs.sum(-1) < top_p).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is below top_p (the most likely is always kept).
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(1, choice).squeeze(1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def _mask_through_end(tokens: torch.Tensor, eos: int | None) -> torch.Tensor:
    """1 up to and including each row's first end token (after BOS), 0 after it."""
    if eos is None:
        return torch.ones_like(tokens)
    is_end = tokens == eos
    is_end[:, 0] = False
    after_end = (is_end.cumsum(1) - is_end.long()) > 0
    return (~after_end).long()


def teacher_text_for(cfg: TailorConfig, teacher_ref: CheckpointRef, on_batch=None) -> TokensRef | None:
    """The teacher's text the recipe's corpus mix asks for (made or found in the work folder); None without it."""
    if TEACHER_SOURCE not in cfg.distill.corpus_mix:
        return None
    sequences = source_share(cfg.distill, cfg.distill.num_samples)[TEACHER_SOURCE]
    work = WorkDir(cfg.work_dir)
    return generate_corpus(
        teacher_ref, cfg.generate, sequences, cfg.distill.seq_len, work.teacher_text, on_batch, work.probes
    )
