"""The frontier's task: heal one cut (a short screen or the profile's whole recipe) and score it on held-out text."""

from __future__ import annotations

from prefect import task

from tailor.common.layout import WorkDir
from tailor.common.resources import stage_cost, stage_start
from tailor.config.settings import DistillConfig
from tailor.data.tokenised import TokensRef
from tailor.distill.activation_cache import uses_activation_cache, write_activation_cache
from tailor.distill.trainer import distill_checkpoint
from tailor.store.checkpoint import CheckpointRef

from ._common import CACHED
from .models import distilled_folder
from .records import HealedCut


@task(name="heal-cut", cache_policy=CACHED, persist_result=True)
def heal_cut(
    teacher: CheckpointRef,
    student: CheckpointRef,
    distill: DistillConfig,
    train: TokensRef,
    heldout: TokensRef,
    work_dir: str,
) -> HealedCut:
    """Distil ``student`` from ``teacher`` with ``distill`` (from the activation cache where it
    applies) and take its held-out corpus perplexity: the end of its healing curve."""
    start = stage_start()
    work = WorkDir(work_dir)
    teacher, student = teacher.verify(), student.verify()
    activations = (
        write_activation_cache(teacher, student, distill, train, work.activations, work.probes)
        if uses_activation_cache(distill)
        else None
    )
    ref, record = distill_checkpoint(
        teacher,
        student,
        distill,
        train,
        distilled_folder(teacher, student, distill, train, heldout, work_dir),
        heldout=heldout,
        activations=activations,
        unkeyed_ok=True,
        probe_dir=work.probes,
    )
    return HealedCut(ref, record, record.heldout_curve[-1][1], stage_cost(start))
