"""The tokenised corpus: every set of token windows the cycle reads, built once and kept on disk.

Layer scoring reads the calibration windows, the teacher cache and the trainer the training
samples, held-out perplexity (and the trainer's healing curve) the held-out documents. One
stage tokenises all three with the base model's tokenizer into one folder named by what they
depend on; each consumer is handed only the file it reads, as a ``TokensRef`` (path and
sha256), so its cache key changes exactly when its tokens do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tailor.common.layout import WorkDir
from tailor.config.settings import DataConfig, DistillConfig, PruneConfig
from tailor.data.corpus import (
    corpus_fingerprint,
    corpus_signature,
    heldout_samples,
    heldout_settings,
    training_samples,
)
from tailor.store.checkpoint import CheckpointRef, code_identity, load_tokenizer, stable_hash
from tailor.store.digested import digest_file, is_intact, recorded_digest, sha256_file, write_digested

SETS = ("train", "calibration", "heldout")
# Held-out windows are kept per source: "<source>/input_ids", "<source>/attention_mask".
_SEP = "/"


@dataclass(frozen=True)
class TokensRef:
    """One tokenised set on disk (a safetensors file) and the sha256 of its bytes."""

    path: str
    fingerprint: str

    def verify(self, contents: bool = True) -> "TokensRef":
        """Fail loudly if the file is gone or (``contents``) its bytes changed since the fingerprint was taken."""
        if not Path(self.path).exists():
            raise FileNotFoundError(f"tokenised samples {self.path} are missing (was the work folder deleted?)")
        if contents and sha256_file(Path(self.path)) != self.fingerprint:
            raise RuntimeError(f"tokenised samples {self.path} do not match fingerprint {self.fingerprint[:12]}")
        return self

    def samples(self) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}`` of the training or calibration set."""
        return load_file(self.verify().path)

    def per_source(self) -> dict[str, dict[str, torch.Tensor]]:
        """The held-out set: ``{source: {"input_ids", "attention_mask"}}``."""
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in load_file(self.verify().path).items():
            source, _, name = key.rpartition(_SEP)
            grouped.setdefault(source, {})[name] = tensor
        return grouped


def tokenised_folder(
    base: CheckpointRef,
    distill: DistillConfig,
    prune: PruneConfig,
    data: DataConfig,
    work_dir: str | Path,
    teacher_text: TokensRef | None = None,
    corpus: str | None = None,
) -> Path:
    """Where the sets live: named by the tokenizer's checkpoint, the corpus settings and the
    corpus files' content (``corpus_fingerprint``; the teacher's text by its content), the data
    settings, every shape and the code's versions. ``corpus``: ``corpus_fingerprint`` when the
    caller has taken it already (the files are hashed here otherwise)."""
    shapes = {
        "train": [distill.num_samples, distill.seq_len, distill.windows_per_doc],
        "calibration": [prune.calibration_samples, prune.calibration_seq_len],
        "heldout": heldout_settings(distill).model_dump(),
    }
    key = stable_hash(
        base.fingerprint,
        corpus_signature(distill),
        corpus or corpus_fingerprint(distill, data),
        shapes,
        data.cache_identity(),
        code_identity(),
        *([teacher_text.fingerprint] if teacher_text is not None else []),
    )
    return WorkDir(work_dir).tokenised / key


def tokenise_corpus(
    base: CheckpointRef,
    distill: DistillConfig,
    prune: PruneConfig,
    data: DataConfig,
    work_dir: str | Path,
    teacher_text: TokensRef | None = None,
    corpus: str | None = None,
) -> dict[str, TokensRef]:
    """The three sets (``SETS``) as files, tokenised once; existing files are reused while they
    match the sha256 recorded when they were written (an edited or deleted one is written
    again). ``teacher_text`` is the teacher's sampled text when ``distill.corpus_mix`` names it;
    ``corpus`` as for ``tokenised_folder``."""
    folder = tokenised_folder(base, distill, prune, data, work_dir, teacher_text, corpus)
    paths = _set_files(folder)
    stale = [name for name, path in paths.items() if not is_intact(path)]
    if stale:
        tokenizer = load_tokenizer(base)
        generated = teacher_text.samples() if teacher_text is not None else None
        built = {
            "train": training_samples(tokenizer, distill, data, teacher_text=generated),
            "calibration": training_samples(
                tokenizer, distill, data, prune.calibration_samples, prune.calibration_seq_len, teacher_text=generated
            ),
            "heldout": {
                f"{source}{_SEP}{name}": t
                for source, s in (heldout_samples(tokenizer, distill, data) if distill.heldout_docs else {}).items()
                for name, t in s.items()
            },
        }
        for name in stale:
            _write_set(paths[name], built[name])
    return tokens_in(folder)


def tokens_in(folder: str | Path) -> dict[str, TokensRef]:
    """The sets of a folder ``tokenise_corpus`` wrote, with the sha256 recorded when each was
    written (not hashed now: a file edited since fails its ``verify``)."""
    paths = _set_files(Path(folder))
    missing = [str(p) for path in paths.values() for p in (path, digest_file(path)) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a tokenised corpus folder: missing {', '.join(missing)}")
    return {name: TokensRef(str(p), recorded_digest(p)) for name, p in paths.items()}


def _write_set(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_digested(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _set_files(folder: Path) -> dict[str, Path]:
    return {name: folder / f"{name}.safetensors" for name in SETS}
