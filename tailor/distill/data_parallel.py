"""Data-parallel distillation from a single process: ``torchrun`` launched on this machine.

Each of ``distill.nproc_per_node`` processes runs ``tailor distill`` (gloo on CPU, nccl on
GPUs, one GPU per process) and takes ``distill.batch_size`` samples of every global batch of
``batch_size x nproc_per_node``; ``DistributedDataParallel`` reduces the gradients before each
step, so the result equals one process trained on the same global batch
(``tests/test_distributed.py``).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tailor.config.settings import DataConfig, DistillConfig
from tailor.data.tokenised import TokensRef
from tailor.distill.trainer import DistillError, training_record
from tailor.store.checkpoint import CheckpointRef, existing_checkpoint


def distill_data_parallel(teacher: CheckpointRef, student: CheckpointRef, cfg: DistillConfig, data: DataConfig,
                          train: TokensRef, out_dir: Path,
                          topk_cache: Path | None = None) -> tuple[CheckpointRef, dict]:
    """``distill_checkpoint``'s result, trained by ``cfg.nproc_per_node`` processes under torchrun
    on the tokenised corpus ``train`` belongs to (its folder's held-out set gives the curve)."""
    if (done := existing_checkpoint(out_dir)) is None:
        with tempfile.TemporaryDirectory(prefix="tailor-ddp-") as tmp:
            # The exact settings, as a profile file the processes load (absolute paths only).
            settings = Path(tmp) / "settings.yaml"
            settings.write_text(yaml.safe_dump({"distill": cfg.model_dump(mode="json"),
                                                "data": data.model_dump(mode="json")}))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                   "--nproc-per-node", str(cfg.nproc_per_node), "-m", "tailor.cli", "distill",
                   "--teacher", teacher.path, "--student", student.path, "--out", str(out_dir),
                   "--profile", str(settings), "--tokens", str(Path(train.verify().path).parent),
                   *(["--topk-cache", str(topk_cache)] if topk_cache else [])]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DistillError(f"data-parallel distillation ({cfg.nproc_per_node} processes) failed with exit "
                               f"code {proc.returncode}:\n{proc.stderr[-4000:]}")
        done = existing_checkpoint(out_dir)
        if done is None:
            raise DistillError(f"data-parallel distillation finished without writing {out_dir}")
    return done, training_record(done)
