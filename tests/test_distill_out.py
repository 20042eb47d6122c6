"""Where a distillation may write, and what it may hand back from there: a finished checkpoint
only for the same settings and inputs, never the teacher or student folder itself; the
data-parallel launch ends within its time limit."""

from __future__ import annotations

import shutil
import stat
import sys
import time
from pathlib import Path

import pytest

from tailor.config.settings import DataConfig, TailorError, load_config
from tailor.distill import data_parallel, distributed
from tailor.distill.trainer import DistillError, distill_checkpoint


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A tiny teacher, its pruned student, their tokens and one finished distillation of them."""
    from unit_data import tiny_distillation_inputs

    root = tmp_path_factory.mktemp("distill-out")
    base, pruned, cfg, tokens = tiny_distillation_inputs(root, checkpoint_every=0)
    ref, _ = distill_checkpoint(base, pruned, cfg, tokens["train"], root / "done", heldout=tokens["heldout"])
    return root, base, pruned, cfg, tokens, ref


def test_a_finished_checkpoint_is_handed_back_only_for_the_same_settings_and_inputs(distilled, tmp_path):
    root, base, pruned, cfg, tokens, done = distilled
    out = tmp_path / "out"
    shutil.copytree(done.path, out)
    again, record = distill_checkpoint(base, pruned, cfg, tokens["train"], out, heldout=tokens["heldout"])
    assert again.fingerprint == done.fingerprint and record.optimizer_steps == 2
    other = cfg.model_copy(update={"learning_rate": 5e-3})
    with pytest.raises(DistillError, match=f"{out} holds a distillation of other settings or inputs.*choose another"):
        distill_checkpoint(base, pruned, other, tokens["train"], out, heldout=tokens["heldout"])
    with pytest.raises(DistillError, match="other settings or inputs"):  # another student
        distill_checkpoint(base, base, cfg, tokens["train"], out, heldout=tokens["heldout"])
    assert (out / "FINGERPRINT").read_text().strip() == done.fingerprint  # left as it was


def test_a_checkpoint_that_records_no_inputs_is_not_handed_back_as_this_runs(distilled, tmp_path):
    """One written before distillations recorded their inputs: ``tailor distill`` cannot tell
    what it was trained with; the flow, whose folder names are keyed by the inputs, may reuse it."""
    from tailor.distill.trainer import INPUTS_FILE
    from tailor.store.checkpoint import FINGERPRINT_FILE, fingerprint_dir

    root, base, pruned, cfg, tokens, done = distilled
    out = tmp_path / "old"
    shutil.copytree(done.path, out)
    (out / INPUTS_FILE).unlink()
    (out / FINGERPRINT_FILE).write_text(fingerprint_dir(out) + "\n")  # as such a checkpoint was written
    with pytest.raises(DistillError, match="records no distillation inputs"):
        distill_checkpoint(base, pruned, cfg, tokens["train"], out, heldout=tokens["heldout"])
    ref, _ = distill_checkpoint(base, pruned, cfg, tokens["train"], out, heldout=tokens["heldout"], unkeyed_ok=True)
    assert ref.fingerprint == fingerprint_dir(out) != done.fingerprint  # handed back, not trained again


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_out_equal_to_the_student_or_teacher_is_refused_before_any_work(distilled, role, monkeypatch):
    root, base, pruned, *_ = distilled
    monkeypatch.setattr(distributed, "tokenise_corpus", lambda *a, **k: pytest.fail("tokenised before the check"))
    cfg = load_config("smoke", [f"work_dir={root}"])
    folder = {"teacher": base, "student": pruned}[role].path
    with pytest.raises(TailorError, match=f"--out {folder} is the --{role} checkpoint"):
        distributed.distill_folders(base.path, pruned.path, folder, cfg)
    with pytest.raises(TailorError, match=f"is inside the --{role} checkpoint"):
        distributed.distill_folders(base.path, pruned.path, Path(folder) / "distilled", cfg)


def test_the_data_parallel_launch_refuses_a_finished_checkpoint_of_other_settings(distilled, tmp_path, monkeypatch):
    root, base, pruned, cfg, tokens, done = distilled
    out = tmp_path / "out"
    shutil.copytree(done.path, out)
    monkeypatch.setattr(data_parallel.subprocess, "Popen", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(DistillError, match="other settings or inputs"):
        data_parallel.distill_data_parallel(
            base, pruned, cfg.model_copy(update={"nproc_per_node": 2}), DataConfig(), tokens["train"], out
        )


def test_a_data_parallel_launch_past_its_time_limit_is_stopped_with_its_processes(distilled, tmp_path, monkeypatch):
    """A hung process group (a collective that never completes) ends at distill.launch_timeout_s,
    and the launch's child processes end with it."""
    root, base, pruned, cfg, tokens, _ = distilled
    pids = tmp_path / "pids"
    fake = tmp_path / "python"
    # Stands in for torchrun: a worker of its own that hangs, then hangs itself.
    fake.write_text(f"#!/bin/sh\nsleep 120 &\necho $! > {pids}\nsleep 120\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake))
    slow = cfg.model_copy(update={"nproc_per_node": 2, "launch_timeout_s": 2})
    began = time.monotonic()
    with pytest.raises(DistillError, match=r"did not finish within 2 seconds \(distill.launch_timeout_s"):
        data_parallel.distill_data_parallel(base, pruned, slow, DataConfig(), tokens["train"], tmp_path / "out")
    assert time.monotonic() - began < 60
    worker = int(pids.read_text())
    for _ in range(50):  # the signal is delivered at once; the process table may lag a little
        if not _alive(worker):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the launch's worker {worker} outlived the time limit")
    assert not (tmp_path / "out").exists()
    # Unset, the limit grows with the run: an hour plus ten minutes per micro-batch of each process.
    assert data_parallel.launch_timeout(cfg.model_copy(update={"nproc_per_node": 2})) == 3600 + 600 * 1 * 1


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's exit status may wait for a PID 1 that never reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
