"""Data-parallel distillation from a single process: ``torchrun`` launched on this machine.

Each of ``distill.nproc_per_node`` processes runs ``tailor.distill.distributed`` (gloo on CPU,
nccl on GPUs, one GPU per process) and takes ``distill.batch_size`` samples of every global batch of
``batch_size x nproc_per_node``; ``DistributedDataParallel`` reduces the gradients before each
step, so the result equals one process trained on the same global batch
(``tests/test_distributed.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tailor.config.settings import DataConfig, DistillConfig
from tailor.data.tokenised import TokensRef, tokens_in
from tailor.distill import distributed
from tailor.distill.record import TrainingRecord, training_record
from tailor.distill.trainer import DistillError, check_distill_out, finished_distillation, inputs_key, planned_steps
from tailor.store.checkpoint import CheckpointRef, existing_checkpoint


def distill_data_parallel(
    teacher: CheckpointRef,
    student: CheckpointRef,
    cfg: DistillConfig,
    data: DataConfig,
    train: TokensRef,
    out_dir: Path,
    topk_cache: Path | None = None,
    *,
    unkeyed_ok: bool = False,
    probe_dir: Path | None = None,
) -> tuple[CheckpointRef, TrainingRecord]:
    """``distill_checkpoint``'s result, trained by ``cfg.nproc_per_node`` processes under torchrun
    on the tokenised corpus ``train`` belongs to (its folder's held-out set gives the curve).
    A finished checkpoint in ``out_dir`` is handed back only for these settings and inputs, as
    the processes themselves would decide (``finished_distillation``), without starting them.
    ``probe_dir`` is where the processes keep and find the machine's precision probe."""
    check_distill_out(out_dir, teacher, student)
    sets = tokens_in(Path(train.verify().path).parent)  # the processes' own view of the tokens
    key = inputs_key(cfg, teacher, student, sets["train"], sets["heldout"], topk_cache, cfg.nproc_per_node)
    if (done := finished_distillation(out_dir, key, unkeyed_ok=unkeyed_ok)) is None:
        with tempfile.TemporaryDirectory(prefix="tailor-ddp-") as tmp:
            # The exact settings, as a profile file the processes load (absolute paths only).
            settings = Path(tmp) / "settings.yaml"
            settings.write_text(
                yaml.safe_dump({"distill": cfg.model_dump(mode="json"), "data": data.model_dump(mode="json")})
            )
            # The worker named by its import, so the layering test sees this dependency.
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nnodes",
                "1",
                "--nproc-per-node",
                str(cfg.nproc_per_node),
                "-m",
                distributed.__name__,
                "--teacher",
                teacher.path,
                "--student",
                student.path,
                "--out",
                str(out_dir),
                "--profile",
                str(settings),
                "--tokens",
                str(Path(train.verify().path).parent),
                *(["--topk-cache", str(topk_cache)] if topk_cache else []),
                *(["--probe-dir", str(probe_dir)] if probe_dir else []),
            ]
            returncode, stderr = _run_group(cmd, launch_timeout(cfg))
        if returncode != 0:
            raise DistillError(
                f"data-parallel distillation ({cfg.nproc_per_node} processes) failed with exit "
                f"code {returncode}:\n{stderr[-4000:]}"
            )
        done = existing_checkpoint(out_dir)
        if done is None:
            raise DistillError(f"data-parallel distillation finished without writing {out_dir}")
    return done, training_record(done)


def launch_timeout(cfg: DistillConfig) -> float:
    """``distill.launch_timeout_s``, or when 0 a limit no healthy run comes near: an hour for
    start-up and scoring plus ten minutes per micro-batch of each process."""
    if cfg.launch_timeout_s:
        return cfg.launch_timeout_s
    return 3600.0 + 600.0 * planned_steps(cfg, cfg.num_samples, cfg.nproc_per_node) * cfg.grad_accum


def _run_group(cmd: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``cmd`` in a process group of its own; past ``timeout_s`` stop the whole group (torchrun
    and every process it started), not only torchrun. Returns (exit code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        _, stderr = proc.communicate()
        raise DistillError(
            f"data-parallel distillation did not finish within {timeout_s:g} seconds "
            "(distill.launch_timeout_s; 0 = computed from the run's size): a hung process group? Its "
            "processes were stopped; set distill.launch_timeout_s higher if the run needs longer. "
            f"Last output:\n{(stderr or '')[-2000:]}"
        ) from None
    except BaseException:
        _stop_group(proc)  # interrupted (Ctrl-C, a cancelled flow): leave no processes behind
        raise


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the group, SIGKILL to what is left after a grace period."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            # torchrun gone; its workers share the group and may still be going.
            os.killpg(proc.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
