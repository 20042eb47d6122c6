"""The teacher's targets and the shared trunk's output for every distillation sample, computed once, on disk.

A student that trains only its last layers runs its frozen first layers on the teacher's own
weights, and the teacher's targets are fixed: recomputing both every step of every epoch
repeats work. ``write_activation_cache`` runs the teacher over the samples once, a batch at a
time through ``teacher_targets`` (the very function live training calls, so training from the
cache is the same to the bit), and writes each tensor as a flat float32 (top-k: float16 values,
int32 ids) file of one fixed-size row per sample. Training reads the rows of each micro-batch
with positioned reads: the files stay out of the process's memory (page cache only), so memory
is flat whatever the corpus size.

Layout of the folder ``<work>/activations/<key>/``::

    meta.json       the plan (depths, k, T), shapes, the trunk's weight digest
    <tensor>.bin    one row per sample, in sample order
    manifest.json   sha256 and size of every file (with its own .sha256): the cache is complete

While it is written the folder is ``<key>.partial`` with ``progress.json`` (rows done, written
after each batch): a killed run continues at the first missing row; the finished folder is
renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tailor.config.settings import DistillConfig, TailorError
from tailor.data.tokenised import TokensRef
from tailor.distill.kd_loss import TopKTeacher
from tailor.distill.objectives import Targets, objective_needs
from tailor.distill.targets import (
    TargetPlan,
    plan_targets,
    span_depths,
    teacher_targets,
    trainable_trunk,
    trunk_digest,
)
from tailor.models.precision import load_teacher, teacher_numerics
from tailor.store.checkpoint import CheckpointRef, code_identity, load_model, stable_hash, write_file_atomically
from tailor.store.digested import is_intact, sha256_file, write_digested

MANIFEST = "manifest.json"
# The teacher signals the cache can hold (logit KD reads the live teacher's head instead).
CACHEABLE = frozenset({"final", "span", "topk"})


class ActivationCacheError(TailorError, ValueError):
    """The cache does not fit the run, or is damaged."""


@dataclass(frozen=True)
class ActivationsRef:
    """A finished activation cache: its folder and the sha256 of its manifest."""

    path: str
    fingerprint: str

    def verify(self, contents: bool = True) -> ActivationsRef:
        """Fail loudly if a file is gone or (``contents``) changed since the cache was written."""
        folder = Path(self.path)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"activation cache {folder} is missing (was the work folder deleted?)")
        if sha256_file(manifest) != self.fingerprint or (contents and not is_intact(manifest)):
            raise RuntimeError(f"activation cache {folder} does not match fingerprint {self.fingerprint[:12]}")
        for name, entry in json.loads(manifest.read_text())["files"].items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != entry["bytes"]:
                raise RuntimeError(f"activation cache file {path} is missing or truncated")
            if contents and sha256_file(path) != entry["sha256"]:
                raise RuntimeError(f"activation cache file {path} was changed since it was written")
        return self


def uses_activation_cache(cfg: DistillConfig) -> bool:
    """Whether this phase trains from an activation cache: asked for, one process, and every
    signal its objective reads can be cached."""
    return cfg.activation_cache and cfg.nproc_per_node == 1 and objective_needs(cfg) <= CACHEABLE


def activation_cache_key(
    teacher: CheckpointRef, student: CheckpointRef, cfg: DistillConfig, train: TokensRef, probe_dir: Path | None
) -> str:
    """What the cached tensors depend on: both checkpoints, the samples, the settings that choose
    depths and signals, the teacher's precision as ``auto`` resolves here, the code."""
    return stable_hash(
        teacher.fingerprint,
        student.fingerprint,
        train.fingerprint,
        sorted(objective_needs(cfg)),
        cfg.num_samples,
        cfg.batch_size,  # the batch shape the teacher ran (and live training runs) at
        cfg.train_last_layers,
        cfg.freeze_embeddings,
        cfg.replacement_layer,
        cfg.linear_map,
        cfg.teacher_topk,
        cfg.temperature,
        teacher_numerics(cfg.teacher_dtype, "cpu", probe_dir),
        code_identity(),
    )


def _tensor_specs(plan: TargetPlan, seq_len: int, hidden: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-sample row shape and dtype of each file the plan needs."""
    specs = {}
    if plan.trunk:
        specs["trunk"] = ((seq_len, hidden), np.float32)
    if "final" in plan.needs:
        specs["final"] = ((seq_len, hidden), np.float32)
    if plan.span_teacher:
        specs["span"] = ((seq_len, hidden), np.float32)
    if plan.topk:
        specs["topk_values"] = ((seq_len, plan.topk), np.float16)
        specs["topk_indices"] = ((seq_len, plan.topk), np.int32)
        specs["topk_rest"] = ((seq_len,), np.float32)
    return specs


def write_activation_cache(
    teacher_ref: CheckpointRef,
    student_ref: CheckpointRef,
    cfg: DistillConfig,
    train: TokensRef,
    root: Path,
    probe_dir: Path | None = None,
    on_batch=None,
) -> ActivationsRef:
    """Compute (or continue, or reuse) the cache for distilling ``student_ref`` from ``teacher_ref``
    on the first ``cfg.num_samples`` of ``train``; ``on_batch(rows_done, rows)`` reports progress."""
    key = activation_cache_key(teacher_ref, student_ref, cfg, train, probe_dir)
    folder = Path(root) / key
    if (folder / MANIFEST).is_file():
        try:
            return ActivationsRef(str(folder), sha256_file(folder / MANIFEST)).verify()
        except (OSError, RuntimeError):
            shutil.rmtree(folder)  # ours (named by its key), damaged: computed again
    partial = folder.with_name(f"{key}.partial")
    samples = {name: rows[: cfg.num_samples] for name, rows in train.samples().items()}
    n, seq_len = samples["input_ids"].shape
    teacher = load_teacher(teacher_ref, cfg.teacher_dtype, samples["input_ids"], probe_dir=probe_dir)
    student = load_model(student_ref)[0]
    needs = objective_needs(cfg)
    span = span_depths(student, teacher, cfg) if "span" in needs else None
    plan = plan_targets(cfg, needs, trainable_trunk(student, teacher, cfg), span)
    meta = {
        "key": key,
        "plan": plan.to_dict(),
        "samples": n,
        "seq_len": seq_len,
        "hidden_size": student.config.hidden_size,
        "trunk_digest": trunk_digest(student, plan.trunk) if plan.trunk else None,
    }
    del student
    specs = _tensor_specs(plan, seq_len, meta["hidden_size"])
    done = _start_or_resume(partial, meta, specs, n)
    files = {name: os.open(partial / f"{name}.bin", os.O_WRONLY) for name in specs}
    try:
        for start in range(done, n, cfg.batch_size):
            stop = min(n, start + cfg.batch_size)
            trunk, targets = teacher_targets(
                teacher, samples["input_ids"][start:stop], samples["attention_mask"][start:stop], plan
            )
            for name, tensor in _flatten(trunk, targets).items():
                row_bytes = _row_bytes(specs[name])
                os.pwrite(files[name], tensor.cpu().numpy().astype(specs[name][1]).tobytes(), start * row_bytes)
            write_file_atomically(
                partial / "progress.json", lambda tmp, s=stop: tmp.write_text(json.dumps({"rows": s}))
            )
            if on_batch is not None:
                on_batch(stop, n)
    finally:
        for fd in files.values():
            os.close(fd)
    torch.save(samples["input_ids"], partial / "input_ids.pt")
    manifest = {
        name: {"sha256": sha256_file(partial / name), "bytes": (partial / name).stat().st_size}
        for name in ["meta.json", "input_ids.pt", *(f"{s}.bin" for s in specs)]
    }
    write_digested(partial / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": manifest}, indent=1)))
    (partial / "progress.json").unlink()
    partial.rename(folder)
    return ActivationsRef(str(folder), sha256_file(folder / MANIFEST))


def _start_or_resume(partial: Path, meta: dict, specs: dict, n: int) -> int:
    """Rows already written by an earlier run of the same key; lays out the files when none."""
    progress = partial / "progress.json"
    if progress.is_file() and json.loads((partial / "meta.json").read_text()) == meta:
        return int(json.loads(progress.read_text())["rows"])
    if partial.exists():
        shutil.rmtree(partial)  # ours (named by its key), from other code or settings: started again
    partial.mkdir(parents=True)
    write_file_atomically(partial / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
    for name, spec in specs.items():
        with (partial / f"{name}.bin").open("wb") as fh:
            fh.truncate(n * _row_bytes(spec))
    write_file_atomically(progress, lambda tmp: tmp.write_text(json.dumps({"rows": 0})))
    return 0


def _row_bytes(spec: tuple[tuple[int, ...], np.dtype]) -> int:
    shape, dtype = spec
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _flatten(trunk: torch.Tensor | None, targets: Targets) -> dict[str, torch.Tensor]:
    out = {"trunk": trunk, "final": targets.final, "span": targets.span}
    if targets.topk is not None:
        out |= {
            "topk_values": targets.topk.values,
            "topk_indices": targets.topk.indices,
            "topk_rest": targets.topk.rest_logsumexp,
        }
    return {k: v for k, v in out.items() if v is not None}


class ActivationCache:
    """A finished cache opened for training: ``batch(idx)`` reads the rows of those samples."""

    def __init__(self, ref: ActivationsRef, samples: dict[str, torch.Tensor]) -> None:
        folder = Path(ref.verify(contents=False).path)
        meta = json.loads((folder / "meta.json").read_text())
        self.plan = TargetPlan.from_dict(meta["plan"])
        self.trunk_digest = meta["trunk_digest"]
        self.folder = folder
        cached_ids = torch.load(folder / "input_ids.pt", weights_only=True)
        if not torch.equal(cached_ids, samples["input_ids"]):
            raise ActivationCacheError(f"activation cache {folder} was computed for other distillation samples")
        self.specs = _tensor_specs(self.plan, meta["seq_len"], meta["hidden_size"])
        self._files = {name: os.open(folder / f"{name}.bin", os.O_RDONLY) for name in self.specs}

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def _rows(self, name: str, idx: list[int]) -> torch.Tensor:
        shape, dtype = self.specs[name]
        size = _row_bytes(self.specs[name])
        fd = self._files[name]
        buffer = b"".join(os.pread(fd, size, i * size) for i in idx)
        return torch.from_numpy(np.frombuffer(buffer, dtype=dtype).reshape(len(idx), *shape).copy())

    def batch(self, idx: list[int]) -> tuple[torch.Tensor | None, Targets]:
        """(the trunk's output or None, the targets) of samples ``idx``, as ``teacher_targets`` gave them."""
        plan = self.plan
        topk = None
        if plan.topk:
            topk = TopKTeacher(
                self._rows("topk_values", idx),
                self._rows("topk_indices", idx),
                self._rows("topk_rest", idx),
                plan.temperature,
            )
        targets = Targets(
            final=self._rows("final", idx) if "final" in self.specs else None,
            span=self._rows("span", idx) if "span" in self.specs else None,
            topk=topk,
        )
        return (self._rows("trunk", idx) if plan.trunk else None), targets
