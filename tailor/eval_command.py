"""``tailor eval``: score one model with the fast evaluator on any lm-eval tasks, outside the flow.

The model is a checkpoint folder (llm-tailor's or any Hugging Face folder), a registered
MLflow model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or a hub id. The output
folder holds lm-eval's own files (results JSON, per-sample JSONL) so any lm-eval tooling
reads them, and, with ``against``, a paired per-task comparison with another evaluation's
samples over the documents both scored.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Callable

from tailor.common.layout import WorkDir
from tailor.common.stats import paired_item_deltas
from tailor.config.settings import TailorConfig, TailorError
from tailor.evaluate.harness import folder_name
from tailor.store.checkpoint import (
    CheckpointRef,
    check_checkpoint_target,
    existing_checkpoint,
    load_model,
    save_model,
    write_checkpoint,
)

_SAMPLES_FILE = re.compile(r"samples_(?P<task>.+)_\d{4}-\d{2}-\d{2}T[\d\-.]+\.jsonl$")
# What ``fingerprint_dir`` writes (sha256, hex): the only tag value that may name a folder.
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


def resolve_model(spec: str, cfg: TailorConfig) -> tuple[CheckpointRef, str]:
    """A checkpoint folder for ``spec`` (materialised into the work folder when it is not one
    already) and the name lm-eval's files give the model."""
    from tailor.models.sources import materialize
    from tailor.registry import tracking

    if spec.startswith("models:/"):
        name, version, fingerprint = tracking.registered_version(cfg.tracking_uri, spec)
        checkpoints = WorkDir(cfg.work_dir).checkpoints
        prefix = f"registered-{folder_name(name)}-v{version}"

        def download(tmp: Path) -> None:
            save_model(*tracking.load_registered(cfg.tracking_uri, name, version), tmp)

        if fingerprint is None:
            return _by_content(download, checkpoints, prefix), f"{name}-v{version}"
        if not _FINGERPRINT.fullmatch(fingerprint):
            # The tag becomes part of a path: anything but a fingerprint could point outside the work folder.
            raise TailorError(
                f"{spec}: its checkpoint_fingerprint tag {fingerprint[:80]!r} is not a checkpoint "
                "fingerprint (64 lowercase hex digits); fix or delete the tag on that version"
            )
        return write_checkpoint(checkpoints / f"{prefix}-{fingerprint}", download), f"{name}-v{version}"
    path = Path(spec).expanduser()
    if path.is_dir():
        ref = existing_checkpoint(path)
        if ref is None:
            if not (path / "config.json").is_file():
                raise TailorError(
                    f"{spec} is neither an llm-tailor checkpoint (FINGERPRINT) nor a Hugging Face "
                    "model folder (config.json)"
                )
            ref = materialize(
                cfg.model.model_copy(update={"source": "hf", "name_or_path": str(path.resolve())}), cfg.work_dir
            )
        return ref.verify(), path.resolve().name
    if "/" not in spec:
        raise TailorError(f"{spec!r} is not a folder, a models:/ URI or a hub id (owner/name)")
    return materialize(cfg.model.model_copy(update={"source": "hf", "name_or_path": spec}), cfg.work_dir), spec


def _by_content(download: Callable[[Path], None], checkpoints: Path, prefix: str) -> CheckpointRef:
    """A version without a fingerprint tag, kept under the fingerprint of what was downloaded:
    its name and number alone do not tell models apart (a recreated registry numbers from 1
    again), so it is downloaded each time and reuses a folder only with the same content."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=checkpoints, prefix=f".{prefix}.download-") as tmp:
        staged = write_checkpoint(Path(tmp) / "model", download)
        folder = checkpoints / f"{prefix}-content-{staged.fingerprint}"
        if existing_checkpoint(folder) is None:
            check_checkpoint_target(folder)
            try:
                Path(staged.path).rename(folder)
            except OSError:
                if existing_checkpoint(folder) is None:  # not another process that moved the same model first
                    raise
    return existing_checkpoint(folder).verify()


def evaluate_to_folder(ref: CheckpointRef, name: str, cfg: TailorConfig, out_dir: Path) -> dict:
    """Evaluate ``ref`` and write lm-eval's files plus ``tailor-eval.json`` (metrics, per-document
    scores) into ``out_dir``; returns that record."""
    from tailor.evaluate.harness import evaluate_model

    model, tokenizer = load_model(ref, dtype=cfg.eval.dtype)
    result = evaluate_model(model, tokenizer, cfg.eval, cfg.data, lm_eval_dir=out_dir, model_name=name)
    record = {
        "model": name,
        "checkpoint": {"path": ref.path, "fingerprint": ref.fingerprint},
        **{k: v for k, v in result.items() if k != "requests"},
    }
    (out_dir / "tailor-eval.json").write_text(json.dumps(record, indent=1))
    return record


def read_samples(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per-document scores {task: {doc_id: {"acc": .., "acc_norm": ..}}} from lm-eval sample files:
    one ``samples_<task>_<time>.jsonl`` or a folder holding them (searched recursively) of one
    evaluation: one model's folder, each task once. Scores of two evaluations pooled would
    compare a mix of models, so such a folder is refused, naming what it holds."""
    path = Path(path)
    files = [
        f for f in ([path] if path.is_file() else sorted(path.rglob("samples_*.jsonl"))) if _SAMPLES_FILE.search(f.name)
    ]
    # lm-eval writes one folder per model under --output_path: a second folder is a second evaluation.
    models = sorted({f.parent for f in files})
    if len(models) > 1:
        raise TailorError(
            f"--against {path} holds {len(models)} evaluations ("
            + ", ".join(str(m.relative_to(path)) for m in models)
            + "); name one of those folders (or one samples_<task>_<time>.jsonl file)"
        )
    by_task: dict[str, list[Path]] = {}
    for file in files:
        by_task.setdefault(_SAMPLES_FILE.search(file.name)["task"], []).append(file)
    for task, task_files in by_task.items():
        if len(task_files) > 1:
            raise TailorError(
                f"--against {path} holds {len(task_files)} evaluations of {task} ("
                + ", ".join(f.name for f in task_files)
                + "); name one samples file, or evaluate into separate --out folders"
            )
    items: dict[str, dict[str, dict[str, float]]] = {}
    for file in files:
        match = _SAMPLES_FILE.search(file.name)
        task = items.setdefault(match["task"], {})
        for line in file.read_text().splitlines():
            if line.strip():
                sample = json.loads(line)
                task[str(sample["doc_id"])] = {m: float(sample[m]) for m in ("acc", "acc_norm") if m in sample}
    if not items:
        raise TailorError(f"--against {path}: no lm-eval sample files (samples_<task>_<time>.jsonl) found")
    return items


def paired_comparison(ours: dict[str, dict], theirs: dict[str, dict]) -> dict[str, dict]:
    """Per task both scored: accuracy change (ours - theirs) over the shared documents with its
    paired bootstrap 95% interval and a verdict that says "cannot tell" when the interval holds 0."""
    out = {}
    for task in sorted(set(ours) & set(theirs)):
        paired = paired_item_deltas(theirs[task], ours[task], "acc")
        if paired is None:
            continue
        low, high = paired["ci_low"], paired["ci_high"]
        out[task] = {
            "delta": paired["delta"],
            "ci95": [low, high],
            "n": paired["n"],
            "verdict": "better" if low > 0 else "worse" if high < 0 else "cannot tell",
        }
    return out
