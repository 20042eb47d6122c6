"""Checkpoint folders identified by content fingerprints.

A stage writes its checkpoint into a temporary sibling folder, records the
fingerprint in ``FINGERPRINT`` and renames the folder into place, so a folder at
its final path is always complete. Stages exchange ``CheckpointRef`` (path +
fingerprint), never model objects. Folder names are keyed by what a checkpoint was
computed from, ``code_identity()`` (the product's and its libraries' versions) included.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

import tailor
from tailor.config.settings import TailorError
from tailor.store.temporary import claimed_file, claimed_folder, stale_prefix

FINGERPRINT_FILE = "FINGERPRINT"
TRAINING_RECORD = "distill_record.json"
"""Written beside a distilled model: how it was trained, timings and speeds included."""
# Not part of a checkpoint's fingerprint: the fingerprint itself, and records of how long
# the checkpoint took to make; the same weights keep one fingerprint however fast they came.
UNHASHED = frozenset({FINGERPRINT_FILE, TRAINING_RECORD})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# transformers initialises models under process-global patches (meta device), which
# breaks when two threads load at once; stages run in a thread pool.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class CheckpointRef:
    """A saved model + tokenizer folder and the sha256 of its contents."""

    path: str
    fingerprint: str

    def verify(self, contents: bool = False) -> "CheckpointRef":
        """Fail loudly if the folder is gone or was rewritten since the fingerprint was taken;
        ``contents=True`` also re-hashes every file (about 2 s per GB), so an edited weight
        file is caught too."""
        stored = Path(self.path) / FINGERPRINT_FILE
        if not stored.exists():
            raise FileNotFoundError(f"checkpoint {self.path} is missing (was the work folder deleted?)")
        if stored.read_text().strip() != self.fingerprint:
            raise RuntimeError(f"checkpoint {self.path} does not match fingerprint {self.fingerprint[:12]}")
        if contents and fingerprint_dir(Path(self.path)) != self.fingerprint:
            raise RuntimeError(f"checkpoint {self.path}: its files changed since fingerprint {self.fingerprint[:12]}")
        return self


def _content_files(folder: Path, recursive: bool = True) -> list[Path]:
    """The files that make a checkpoint what it is, in sorted order: ``UNHASHED`` left out."""
    files = Path(folder).rglob("*") if recursive else Path(folder).glob("*")
    return sorted(p for p in files if p.is_file() and p.name not in UNHASHED)


def fingerprint_dir(folder: Path, recursive: bool = True) -> str:
    """sha256 over every content file's relative name and bytes, in sorted order
    (``recursive=False``: the files directly in ``folder`` only)."""
    h = hashlib.sha256()
    for f in _content_files(folder, recursive):
        h.update(str(f.relative_to(folder)).encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def stable_hash(*parts: object) -> str:
    """Short deterministic hash of JSON-able parts, for naming derived artefacts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def code_identity() -> dict[str, str]:
    """The versions of the code a cached result was computed with: llm-tailor's and those of
    torch, transformers and lm-eval. Part of every cache key (the Prefect tasks' and the work
    folder's), so an upgrade computes again instead of serving what older code produced."""
    return {
        "tailor": tailor.__version__,
        "torch": torch.__version__,
        "transformers": _installed("transformers"),
        "lm_eval": _installed("lm_eval"),
    }


@lru_cache(maxsize=None)
def _installed(package: str) -> str:
    # Reading package metadata scans site-packages; a process does not change its libraries.
    return version(package)


def existing_checkpoint(folder: Path) -> CheckpointRef | None:
    """The checkpoint at ``folder`` as its FINGERPRINT file names it (its files unread)."""
    stored = Path(folder) / FINGERPRINT_FILE
    if stored.exists():
        return CheckpointRef(str(folder), stored.read_text().strip())
    return None


def intact_checkpoint(folder: Path) -> CheckpointRef | None:
    """The checkpoint at ``folder`` when its files still hash to its FINGERPRINT; None when there
    is none or one was edited since. Reads every file (about 2 s per GB)."""
    ref = existing_checkpoint(folder)
    if ref is None:
        return None
    try:
        return ref.verify(contents=True)
    except (OSError, RuntimeError):
        return None


def write_checkpoint(folder: Path, writer: Callable[[Path], None]) -> CheckpointRef:
    """Run ``writer(tmp_folder)``, fingerprint the result and move it to ``folder`` atomically.

    If ``folder`` is already complete and its files still match its fingerprint it is reused (a
    re-run continues from what exists). One of ours (it has a FINGERPRINT) whose files were
    edited since is written again and replaced: a caller asking for this checkpoint is asking
    for the content its name stands for. A folder without FINGERPRINT is the user's and is
    refused (``check_checkpoint_target``).
    """
    folder = Path(folder)
    if (ref := intact_checkpoint(folder)) is not None:
        return ref
    if existing_checkpoint(folder) is None:
        check_checkpoint_target(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary folder: two runs writing the same checkpoint at once (a sweep
    # beside a run) must not write into each other's files.
    with claimed_folder(folder) as tmp:
        writer(tmp)
        fp = fingerprint_dir(tmp)
        (tmp / FINGERPRINT_FILE).write_text(fp + "\n")
        with _LOAD_LOCK:
            if (ref := intact_checkpoint(folder)) is not None:
                return ref  # another writer finished first; ours is discarded below
            if existing_checkpoint(folder) is not None:
                _set_aside(folder)  # ours, edited since it was written
            check_checkpoint_target(folder)
            try:
                tmp.rename(folder)
            except OSError:
                if (ref := existing_checkpoint(folder)) is None:  # not a writer in another process
                    raise
                return ref
        return CheckpointRef(str(folder), fp)


def _set_aside(folder: Path) -> None:
    """Move a damaged checkpoint of ours out of the way, then delete it: a reader sees the old
    folder or none, never one half deleted."""
    stale = folder.with_name(f"{stale_prefix(folder)}{uuid.uuid4().hex[:8]}")
    folder.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)


class CheckpointError(TailorError, RuntimeError):
    """A checkpoint cannot be written where it was asked for."""


def check_checkpoint_target(folder: Path) -> None:
    """Before any work: a checkpoint can be written at ``folder``.

    A non-empty folder without a FINGERPRINT was not written by us (ours appear complete, by
    rename): it is the user's, and is never deleted or overwritten."""
    if folder.is_dir() and any(folder.iterdir()):
        raise CheckpointError(
            f"{folder} exists and is not an llm-tailor checkpoint (no {FINGERPRINT_FILE} file); "
            "it is left untouched: choose another output folder or move it away"
        )
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is a file, not a checkpoint folder; it is left untouched")


def write_file_atomically(path: Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_file)`` and rename it onto ``path``: a kill mid-write leaves the
    previous file (or none), never a truncated one. The temporary file has a name of its
    own (two writers never share it), is flushed to disk before the rename and removed
    if the writer fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with claimed_file(path) as tmp:
        writer(tmp)
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)


def save_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def load_model(ref: CheckpointRef, dtype: str = "float32", device: str = "cpu"):
    """(model in eval mode, tokenizer) from a verified checkpoint folder."""
    from transformers import AutoModelForCausalLM

    ref.verify()
    with _LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=_DTYPES[dtype]).to(device)
    model.eval()
    return model, load_tokenizer(ref)


def load_tokenizer(ref: CheckpointRef):
    from transformers import AutoTokenizer

    with _LOAD_LOCK:
        return AutoTokenizer.from_pretrained(ref.path)


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once), as ``model.num_parameters()``."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def folder_size_bytes(folder: str | Path) -> int:
    """Bytes of the content a fingerprint covers: the same weights have the same size however
    long their training took (the training record's times are not part of the model)."""
    return sum(f.stat().st_size for f in _content_files(Path(folder)))
