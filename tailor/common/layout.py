"""The work folder's layout in one place: what llm-tailor keeps under ``work_dir``.

Every stage's files live in a sub-folder named here, so a person (or a cleanup script) can
read the layout off this class instead of from a dozen call sites::

    checkpoints/     base-*, pruned-*, distilled-*, registered-* model folders (each with FINGERPRINT)
    tokenised/       the tokenise stage's train / calibration / heldout token files
    teacher-text/    text the teacher sampled (distill.corpus_mix source "teacher")
    importance/      layer scores                teacher-cache/   the teacher's top-k logits
    evals/           per-document scores         plots/           layer-score figures
    reports/         flow reports (no --out)     sweeps/          sweep reports (no --out)
    prefect-home/    local Prefect state
    probes/          each machine's bfloat16-or-float32 probe (what ``auto`` precision became there)
    mlflow.db, mlartifacts/                      the local MLflow store
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tokenised(self) -> Path:
        return self.root / "tokenised"

    @property
    def teacher_text(self) -> Path:
        return self.root / "teacher-text"

    @property
    def importance(self) -> Path:
        return self.root / "importance"

    @property
    def teacher_cache(self) -> Path:
        return self.root / "teacher-cache"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def frontiers(self) -> Path:
        return self.root / "frontiers"

    @property
    def evals(self) -> Path:
        return self.root / "evals"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def sweeps(self) -> Path:
        return self.root / "sweeps"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect-home"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"
