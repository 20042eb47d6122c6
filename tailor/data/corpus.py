"""The distillation corpus: weighted sources, a held-out slice training never sees, samples.

Why it is shaped this way (benchmarks/healing.py measures each choice; see docs/healing.md):

* A sample is the *start* of a document, BOS first, as lm-eval feeds Gemma its prompts;
  the earlier windows cut through documents mostly started mid-text without BOS.
* What the student learns follows the corpus: the document starts of the C4 sample are
  navigation menus and link lists, and distilling on them cost LAMBADA 0.28 accuracy. So
  the mix of sources is a recipe setting (``distill.corpus_mix``), not an accident of
  file order.
* The last ``distill.heldout_docs`` documents of every source are never trained on; their
  perplexity is a cheap, low-noise measure of pruning damage and of healing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tailor.config.settings import TEACHER_SOURCE, DataConfig, DistillConfig, TailorError
from tailor.store.digested import sha256_file


class CorpusError(TailorError, ValueError):
    """The distillation corpus cannot provide what the recipe asks for."""


def read_documents(path: Path) -> list[str]:
    """Non-empty ``text`` fields of a JSON Lines file; a line without one is an error naming it."""
    if not path.exists():
        raise CorpusError(f"distill.corpus_mix: {path} does not exist")
    docs = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise CorpusError(f'{path}:{line_no}: a corpus line needs a string field "text"')
            if row["text"].strip():
                docs.append(row["text"])
    return docs


def corpus_signature(cfg: DistillConfig) -> dict:
    """The settings that decide which text becomes samples (for cache keys; the text itself is
    ``corpus_fingerprint``)."""
    return {
        "corpus": cfg.corpus,
        "mix": cfg.corpus_mix,
        "heldout_docs": cfg.heldout_docs,
        "windows_per_doc": cfg.windows_per_doc,
        "sample_format": "bos-first-windows",
    }


def corpus_fingerprint(cfg: DistillConfig, data: DataConfig) -> str:
    """sha256 of what the samples are read from, for cache keys: offline, every corpus_mix file's
    name and bytes (an edited file is a new corpus); hub, the streamed dataset's name only (no
    revision is pinned, so what the hub serves under the name is not part of the key)."""
    if data.mode == "hub":
        parts: object = {"hub": cfg.corpus}
    else:
        parts = {src: _digest(Path(data.data_dir) / src) for src in sorted(file_sources(cfg))}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _digest(path: Path) -> str:
    if not path.is_file():
        raise CorpusError(f"distill.corpus_mix: {path} does not exist")
    return sha256_file(path)


def corpus_datasets(cfg: DistillConfig, data: DataConfig) -> list[dict[str, str]]:
    """The distillation corpus as dataset inputs for tracking: {"name", "digest", "source", "context"};
    offline, one per corpus_mix file with its sha256; hub, the streamed dataset's name."""
    if data.mode == "hub":
        return [
            {
                "name": cfg.corpus,
                "digest": hashlib.sha256(cfg.corpus.encode()).hexdigest(),
                "source": f"hf://datasets/{cfg.corpus}",
                "context": "distillation",
            }
        ]
    return [
        {
            "name": Path(src).stem,
            "digest": sha256_file(Path(data.data_dir) / src),
            "source": str(Path(data.data_dir) / src),
            "context": "distillation",
        }
        for src in file_sources(cfg)
    ]


def file_sources(cfg: DistillConfig) -> list[str]:
    """The corpus_mix entries that are files (all but the teacher's own text)."""
    return [src for src in cfg.corpus_mix if src != TEACHER_SOURCE]


def source_share(cfg: DistillConfig, total: int) -> dict[str, int]:
    """How many of ``total`` samples each source gives: its weight's share, largest remainders
    rounded up, so the counts add up to ``total`` exactly."""
    weights = cfg.corpus_mix
    norm = sum(weights.values())
    exact = {src: total * w / norm for src, w in weights.items()}
    counts = {src: int(v) for src, v in exact.items()}
    by_remainder = sorted(weights, key=lambda s: (counts[s] - exact[s], s))
    for src in by_remainder[: total - sum(counts.values())]:
        counts[src] += 1
    return counts


def split_documents(docs: list[str], heldout: int) -> tuple[list[str], list[str]]:
    """(training, held-out): the last ``heldout`` documents are held out, whatever the seed."""
    if heldout == 0:
        return docs, []
    return docs[:-heldout], docs[-heldout:]


def offline_sources(cfg: DistillConfig, data: DataConfig) -> dict[str, tuple[list[str], list[str]]]:
    """Each offline source's (training, held-out) documents."""
    return {
        src: split_documents(read_documents(Path(data.data_dir) / src), cfg.heldout_docs) for src in file_sources(cfg)
    }


def check_corpus(cfg: DistillConfig, data: DataConfig) -> None:
    """Before any heavy work: every source exists, is well formed and can give its share of
    samples after the held-out slice is set aside (without tokenising: one sample per
    ``windows_per_doc`` window of a document at most)."""
    if data.mode == "hub":
        return
    wanted = source_share(cfg, cfg.num_samples)
    for src, (train, held) in offline_sources(cfg, data).items():
        if len(held) < cfg.heldout_docs or not train:
            raise CorpusError(
                f"distill.heldout_docs={cfg.heldout_docs} leaves no training documents in {src} "
                f"({len(train) + len(held)} documents); allowed: below {len(train) + len(held)}"
            )
        most = len(train) * cfg.windows_per_doc
        if wanted[src] > most:
            raise CorpusError(
                f"distill.num_samples={cfg.num_samples} asks {src} for {wanted[src]} samples (its distill.corpus_mix "
                f"share), but it holds {len(train)} training documents (distill.heldout_docs={cfg.heldout_docs} "
                f"held out) x distill.windows_per_doc={cfg.windows_per_doc} = at most {most}; lower num_samples, "
                "raise windows_per_doc or change the mix"
            )


def training_texts(cfg: DistillConfig, data: DataConfig) -> Iterator[tuple[str, str]]:
    """(source, text) of the training documents, each source in file order."""
    if data.mode == "hub":
        for i, text in enumerate(_hub_texts(cfg)):
            if i >= cfg.heldout_docs:
                yield cfg.corpus, text
        return
    for src, (train, _) in offline_sources(cfg, data).items():
        for text in train:
            yield src, text


def heldout_texts(cfg: DistillConfig, data: DataConfig) -> dict[str, list[str]]:
    """The held-out documents of every source (hub mode: the stream's first ``heldout_docs``)."""
    if data.mode == "hub":
        docs = []
        for text in _hub_texts(cfg):
            if len(docs) == cfg.heldout_docs:
                break
            docs.append(text)
        return {cfg.corpus: docs}
    return {src: held for src, (_, held) in offline_sources(cfg, data).items()}


def _hub_texts(cfg: DistillConfig) -> Iterator[str]:
    import datasets

    for row in datasets.load_dataset(cfg.corpus, split="train", streaming=True):
        if row["text"].strip():
            yield row["text"]


def document_windows(tokenizer, text: str, seq_len: int, windows: int) -> Iterator[list[int]]:
    """Up to ``windows`` token windows of one document, each at most ``seq_len`` long and BOS first.

    The tokenizer adds BOS to the document's start; later windows get it prepended, so no
    sample starts mid-text without it.
    """
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    starts_with_bos = bos is not None and ids[:1] == [bos]
    body = ids[1:] if starts_with_bos else ids
    step = seq_len - 1 if starts_with_bos else seq_len
    for k in range(windows):
        piece = body[k * step : (k + 1) * step]
        window = [bos] + piece if starts_with_bos else piece
        if len(piece) < 1 or len(window) < 2:
            return
        yield window


def build_samples(
    tokenizer, texts: Iterable[str], seq_len: int, num_samples: int, windows_per_doc: int = 1
) -> dict[str, torch.Tensor]:
    """Fixed-length samples, padded at the end: up to ``windows_per_doc`` BOS-first windows per document."""
    rows: list[list[int]] = []
    for text in texts:
        for window in document_windows(tokenizer, text, seq_len, windows_per_doc):
            rows.append(window)
            if len(rows) == num_samples:
                return pad_rows(tokenizer, rows, seq_len)
    if not rows:
        raise CorpusError("the distillation corpus produced no samples (empty corpus?)")
    return pad_rows(tokenizer, rows, seq_len)


def pad_rows(tokenizer, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {
        "input_ids": torch.tensor([r + [pad] * (seq_len - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (seq_len - len(r)) for r in rows]),
    }


def training_samples(
    tokenizer,
    cfg: DistillConfig,
    data: DataConfig,
    num_samples: int | None = None,
    seq_len: int | None = None,
    teacher_text: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The recipe's training samples: each source's share of ``num_samples`` (default
    ``cfg.num_samples``), interleaved by weight so any prefix keeps the mix. ``teacher_text``
    (token ids and mask) is the source ``TEACHER_SOURCE`` when the mix names it."""
    num_samples = num_samples or cfg.num_samples
    seq_len = seq_len or cfg.seq_len
    if data.mode == "hub":
        return build_samples(
            tokenizer, (t for _, t in training_texts(cfg, data)), seq_len, num_samples, cfg.windows_per_doc
        )
    wanted = source_share(cfg, num_samples)
    per_source: dict[str, list[list[int]]] = {src: [] for src in wanted}
    if TEACHER_SOURCE in wanted:
        if teacher_text is None:
            raise CorpusError(f"distill.corpus_mix names {TEACHER_SOURCE!r} but no teacher text was generated")
        rows = [
            ids[: int(m.sum())].tolist() for ids, m in zip(teacher_text["input_ids"], teacher_text["attention_mask"])
        ]
        per_source[TEACHER_SOURCE] = [r[:seq_len] for r in rows[: wanted[TEACHER_SOURCE]] if len(r) >= 2]
    for src, text in training_texts(cfg, data):
        if len(per_source[src]) >= wanted[src]:
            continue
        for window in document_windows(tokenizer, text, seq_len, cfg.windows_per_doc):
            if len(per_source[src]) < wanted[src]:
                per_source[src].append(window)
    for src, rows in per_source.items():
        if len(rows) < wanted[src]:
            raise CorpusError(
                f"distill.corpus_mix: {src} gave {len(rows)} samples of the {wanted[src]} its share of "
                f"distill.num_samples={num_samples} needs; lower num_samples or raise windows_per_doc"
            )
    return pad_rows(tokenizer, _interleave(per_source, wanted), seq_len)


def _interleave(per_source: dict[str, list[list[int]]], wanted: dict[str, int]) -> list[list[int]]:
    """Rows of all sources in the order of their quotas' progress (a deterministic, even blend)."""
    keyed = [((i + 0.5) / wanted[src], src, row) for src, rows in per_source.items() for i, row in enumerate(rows)]
    return [row for _, _, row in sorted(keyed, key=lambda k: (k[0], k[1]))]


def heldout_settings(cfg: DistillConfig) -> DistillConfig:
    """Only what the held-out slice depends on (the rest at defaults), so a stage keyed by it
    is not redone when a training setting such as the learning rate changes."""
    return DistillConfig(
        corpus=cfg.corpus, corpus_mix=cfg.corpus_mix, heldout_docs=cfg.heldout_docs, seq_len=cfg.seq_len
    )


def heldout_samples(tokenizer, cfg: DistillConfig, data: DataConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Each source's held-out documents as one BOS-first window of ``cfg.seq_len`` tokens."""
    return {
        src: build_samples(tokenizer, docs, cfg.seq_len, len(docs))
        for src, docs in heldout_texts(cfg, data).items()
        if docs
    }
